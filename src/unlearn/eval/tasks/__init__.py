"""Task configs bundled for lm-evaluation-harness (`TaskManager(include_path=TASKS_DIR)`).

The YAMLs under this folder define `wmdp_bio_robust` and `wmdp_bio_cloze`; `utils.py` holds the
`process_results` functions they name, which the mini world's generated tasks use too.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
