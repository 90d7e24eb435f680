"""verify_layout's ranks as a job of the session's reused world (tests/worldpool.py): the ranks that
`verify_layout` would spawn (tp * pp interpreters importing torch and megatron-core) are the world's.

    run_in_world(this file, tp * pp, [TP, PP, RESULT_DIR, JOBS_JSON])
"""

import json
import sys

from internvl_mcore.convert.distributed import check_layout_in_world

if __name__ == "__main__":
    tp, pp, result_dir, jobs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    check_layout_in_world(tp, pp, [tuple(job) for job in jobs], result_dir)  # the pool's teardown ends its groups
