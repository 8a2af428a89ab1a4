"""Running train_net.py and the tools from the demos: a console that shows the progress lines,
each run's whole output kept in its folder, and output folders that never replace a result."""

import collections
import os
import re
import subprocess
import sys
import time

# What the console shows of a run; everything goes to <run>/console.log.
SHOW = re.compile(r"eta: |Starting training|Overall training speed|Total inference|Traceback|Error|error:")
BOX_TABLE = "Evaluation results for bbox"  # shown with the 3 lines of its table


def fresh_output_dir(base):
    """`base`, or base-2, base-3, ... : the first that does not exist."""
    candidate, n = base, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def run_logged(name, cmd, log_path, env, cwd, show=SHOW):
    """Runs `cmd`, writing its output to `log_path` and showing the lines `show` matches (and
    COCO's box table) prefixed by [name]; on failure, its last lines and an exit naming the log."""
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    tail = collections.deque(maxlen=40)  # shown if the run fails
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        )
        table_lines = 0
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            if BOX_TABLE in line:
                table_lines = 4
            if table_lines or show.search(line):
                print(f"[{name}] {line.rstrip()}", flush=True)
                table_lines = max(0, table_lines - 1)
        proc.wait()
    if proc.returncode != 0:
        sys.stdout.write("".join(tail))
        sys.exit(f"{os.path.basename(sys.argv[0])}: {name} failed (exit {proc.returncode}); full log: {log_path}")
    print(f"=== {name} done in {time.time() - start:.0f} s", flush=True)


def run_train_net(name, config, run_dir, extra_opts, env, repo_root, launch_args=()):
    """train_net.py --config-file `config` OUTPUT_DIR `run_dir` `extra_opts`, logged in run_dir/console.log."""
    os.makedirs(run_dir)
    cmd = [sys.executable, os.path.join(repo_root, "train_net.py"), *launch_args, "--config-file", config]
    run_logged(name, cmd + ["OUTPUT_DIR", run_dir, *extra_opts], os.path.join(run_dir, "console.log"), env, repo_root)
    return run_dir
