"""Memory per rank and seconds per step of `rlhf grpo` on 1 process, N data-parallel processes, and
N processes with FSDP2 sharding (`--full --fsdp`), side by side in one run:

    .venv/bin/python bench/scale_out.py                      # smollm2-135m, 2 processes, 3 steps
    .venv/bin/python bench/scale_out.py --model tiny-random --steps 2

Every configuration runs the same global batch (prompts x completions per step) with the same
settings, started exactly as a user starts it (`python -m rlhfkit` or `torchrun -m rlhfkit`), each in
a fresh process whose peak RSS is that of its largest process (the launcher waits for its ranks, so
the ranks' peak is included). The CPU's threads are split over the processes (OMP_NUM_THREADS =
cores / N), so 1 process and N processes use the same cores: on a CPU, data parallelism buys
nothing in speed; what the table shows is the memory each rank needs. On GPUs each rank has its own
device and the step time divides instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _floors import matmul_gflops

REWARD = f"{Path(__file__).resolve().parents[1] / 'tests' / 'assets' / 'token_reward.py'}:favoured_share"

PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, flush=True)
sys.exit(code)
"""


def launch(nproc: int, args: list[str], threads: int) -> tuple[float, str]:
    """Peak RSS (MB) of the run's largest process, and its output."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "rlhfkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "rlhfkit", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    peak = next(float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_MB"))
    return peak, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from rlhfkit.data import write_jsonl

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    topics = ["the sea", "a city", "music", "a garden", "the moon", "winter", "a train", "bread"]
    write_jsonl(work / "prompts.jsonl", [{"prompt": f"Write one line about {t}."} for t in topics * 4])
    common = [
        "--reward", REWARD, "--prompts", str(work / "prompts.jsonl"), "--policy", args.model,
        "--max-steps", str(args.steps), "--batch-size", str(args.prompts_per_step), "--num-generations", "4",
        "--mini-batch-size", str(4 * args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens),
        "--missing-eos-penalty", "off", "--save-every", "0", "--learning-rate", "1e-5",
    ]  # fmt: skip
    n = args.nproc
    configs = [
        ("LoRA, 1 process", 1, []),
        (f"LoRA, {n} processes (DDP)", n, []),
        ("--full, 1 process", 1, ["--full"]),
        (f"--full, {n} processes (DDP)", n, ["--full"]),
        (f"--full --fsdp, {n} processes (FSDP2)", n, ["--full", "--fsdp"]),
    ]
    gflops_start = matmul_gflops()
    rows = []
    for name, nproc, extra in configs:
        out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        peak, _ = launch(nproc, ["grpo", *common, "--out", str(out), *extra], max(1, cores // nproc))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        later = [m["seconds"] for m in metrics[1:]] or [metrics[0]["seconds"]]  # step 1 warms up
        rows.append((name, peak, sum(later) / len(later), metrics[-1]["reward_mean"]))
        print(f"  {name}: peak RSS {peak:.0f} MB, {rows[-1][2]:.2f} s/step", file=sys.stderr, flush=True)
    gflops_end = matmul_gflops()

    print(f"\n`rlhf grpo` on {args.model}: {args.prompts_per_step} prompts x 4 completions per step, "
          f"{args.max_new_tokens} new tokens, {args.steps} steps; {cores} CPU cores split over the processes; "
          f"fp32 matmul (2048^3, best of 5): {gflops_start:.0f} GFLOP/s before, {gflops_end:.0f} after.\n")  # fmt: skip
    print("| configuration | peak RSS of the largest process (MB) | vs 1 process | s/step (after step 1) |")
    print("|---|---|---|---|")
    base = {False: rows[0][1], True: rows[2][1]}
    for name, peak, seconds, _ in rows:
        ratio = peak / base["--full" in name]
        print(f"| {name} | {peak:.0f} | {ratio:.2f}x | {seconds:.2f} |")


if __name__ == "__main__":
    main()
