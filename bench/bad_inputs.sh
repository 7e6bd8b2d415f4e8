#!/usr/bin/env bash
# Issue 11's bad inputs, run through the command line on a tiny world: each must exit 2 with one
# line on stderr, and leave the user's files as they were. Prints one row per case.
#
#   bash bench/bad_inputs.sh WORLD_DIR          (a `unlearn world build --preset tiny` world)
set -u
W=${1:?usage: bench/bad_inputs.sh WORLD_DIR}
U=${UNLEARN:-.venv/bin/unlearn}
PY=${PYTHON:-.venv/bin/python}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
TARGET=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['target'])" "$W/world.json")
fast=(--max_steps 1 --pdbs 2 --grad_accum 1 --num_train_examples 4 --progress false)

# A previous run dir holding a model, a user's folder, a plain file, broken input files.
mkdir -p "$T/prev/model" "$T/mine" && cp -r "$W/$TARGET/." "$T/prev/model/"
echo "1,2,3" >"$T/mine/data.csv"
echo "a file" >"$T/file.txt"
$PY - "$W" "$T" <<'EOF'
import json, pathlib, sys
w, t = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = [json.loads(l) for l in (w / "questions/forget_unlearn.jsonl").read_text().splitlines()]
for name, change in {"neg": {"answer": -1}, "seven": {"answer": 7}, "one": {"choices": [" x"], "answer": 0}}.items():
    (t / f"q_{name}.jsonl").write_text("".join(json.dumps({**r, **change}) + "\n" for r in rows[:3]))
(t / "q_badjson.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
(t / "q_empty.jsonl").write_text("")
(t / "q_bytes.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n\xff\xfe\n")
(t / "c_bytes.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
(t / "c_json.jsonl").write_text('{"text": "fine"}\n{"text": \n')
(t / "foreign.db").write_bytes(b"")
import sqlite3
c = sqlite3.connect(t / "foreign.db"); c.execute("CREATE TABLE mine (x)"); c.commit(); c.close()
(t / "junk.db").write_text("not a database")
EOF
world_with() {  # a copy of the world whose forget questions are $1
  rm -rf "$T/w2" && cp -r "$W" "$T/w2" && cp "$1" "$T/w2/questions/forget_unlearn.jsonl"
  echo "$T/w2"
}

pass=0; fail=0
check() {  # name, command...
  local name=$1; shift
  local before; before=$(cd "$T" && find prev mine file.txt -type f -exec md5sum {} + | sort | md5sum)
  "$@" >"$T/out.log" 2>"$T/err.log"; local rc=$?
  local after; after=$(cd "$T" && find prev mine file.txt -type f -exec md5sum {} + | sort | md5sum)
  local lines; lines=$(grep -c . "$T/err.log")
  if [ "$rc" = 2 ] && [ "$lines" = 1 ] && [ "$before" = "$after" ]; then
    pass=$((pass + 1)); printf 'ok    %-44s %s\n' "$name" "$(cut -c1-110 "$T/err.log")"
  else
    fail=$((fail + 1)); printf 'FAIL  %-44s rc=%s lines=%s same=%s\n' "$name" "$rc" "$lines" \
      "$([ "$before" = "$after" ] && echo yes || echo NO)"; tail -3 "$T/err.log"
  fi
}

check "run --out holding the input model" $U run --world "$W" --model "$T/prev/model" --out "$T/prev" "${fast[@]}"
check "attack --out holding the input model" $U attack --world "$W" --model "$T/prev/model" --out "$T/prev"
check "run --out a user's folder" $U run --world "$W" --out "$T/mine" "${fast[@]}"
check "run --out a file" $U run --world "$W" --out "$T/file.txt" "${fast[@]}"
check "fit-lens --out a user's folder" $U fit-lens --world "$W" --out "$T/mine"
check "fit-affine --out a file" $U fit-affine --world "$W" --out "$T/file.txt"
for q in neg seven one badjson empty bytes; do
  check "eval: question file ($q)" $U eval --world "$(world_with "$T/q_$q.jsonl")" --model "$W/$TARGET"
done
check "run: question file (answer -1)" $U run --world "$(world_with "$T/q_neg.jsonl")" --out "$T/r1" "${fast[@]}"
check "run: corpus with bad bytes" $U run --world "$W" --forget_corpus "$T/c_bytes.jsonl" --out "$T/r2" "${fast[@]}"
check "attack: corpus with a bad JSON line" $U attack --world "$W" --model "$W/$TARGET" --corpus "$T/c_json.jsonl" --out "$T/a1"
check "fit-lens: corpus with bad bytes" $U fit-lens --world "$W" --texts "$T/c_bytes.jsonl" --out "$T/l1"
check "run --store a foreign database" $U run --world "$W" --store "$T/foreign.db" --out "$T/r3" "${fast[@]}"
check "run --store a junk file" $U run --world "$W" --store "$T/junk.db" --out "$T/r4" "${fast[@]}"
check "run --lora_target_modules nonsense" $U run --world "$W" --lora_target_modules nope --out "$T/r5" "${fast[@]}"
check "eval --output a directory" $U eval --world "$W" --model "$W/$TARGET" --output "$T/mine"
check "eval --timeout nan" $U eval --world "$W" --model "$W/$TARGET" --backend lm-eval --timeout nan
check "run --revision with a local dir" $U run --world "$W" --model "$W/$TARGET" --revision v1 --out "$T/r6" "${fast[@]}"
check "report with a junk store" $U report --store "$T/junk.db" --out "$T/rep"
$PY - "$W" "$T" <<'EOF2'
import sys, yaml
w, t = sys.argv[1], sys.argv[2]
grid = {k: list(range(1, 11)) for k in ("seed", "max_steps", "lora_r", "lora_alpha")}
grid |= {k: [float(i) for i in range(1, 11)] for k in ("remove_coef", "retain_coef", "lr")}
yaml.safe_dump({"name": "big", "world": w, "out": f"{t}/sweep", "method": "lens", "grid": grid},
               open(f"{t}/big.yaml", "w"))
EOF2
check "sweep --dry-run of 10^7 points" $U sweep "$T/big.yaml" --dry-run
check "demo --world /nope" $U demo --world /nope --out "$T/demo"
for d in r1 r2 r3 r4 r5 r6 a1 l1 rep demo sweep; do
  [ -e "$T/$d" ] && { fail=$((fail + 1)); echo "FAIL  left behind: $d"; }
done
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
