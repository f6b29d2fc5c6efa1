"""The toxicity-vs-KL frontier of the quick demo's PPO stage, at several KL settings.

Runs the demo's own PPO stage (``rlhfkit.demo.demo_rl_config``: same prompts, reward model, steps
and sampling; the reward-hacking monitor off) once per KL setting, from one shared reward model,
then evaluates every run beside the base on the held-out prompts in one `rlhf eval` pass (same
sampling seed for all) and prints a table: toxicity and its relative cut, KL from the base,
distinct-2 (tuned / base), deflection rate (tuned - base), EOS rate (tuned / base), fluency
(tuned / base), and the PPO run's last-5-step mean KL. Plots toxicity against KL, each point
labelled with distinct-2 and deflection, to ``bench/frontier.png``.

    rlhf demo --quick --out runs/demo-quick                       # once: prompts + reward model
    .venv/bin/python bench/frontier.py --data runs/demo-quick     # ~8 min per point on 2 cores

A point is ``[ALGO@]KIND:VALUE[xSTEPS]``: ``ALGO`` ppo (default), grpo or rloo (the demo's
``--algo``); ``KIND`` ``fixed`` (constant KL coefficient; PPO, RLOO), ``target`` (adaptive controller
starting from the demo's coefficient; PPO, RLOO) or ``beta`` (GRPO's KL weight in the loss);
``xSTEPS`` overrides ``--steps`` for that point (to give algorithms the same time budget). E.g.
``target:2 rloo@target:2x60 grpo@beta:0.04x60``. Finished runs are reused (delete
bench/.cache/frontier to start over); a killed one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_POINTS = ["fixed:0.05", "fixed:0.2", "target:2", "target:3"]


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def parse_point(point: str, default_steps: int) -> tuple[str, dict, int]:
    """``[ALGO@]KIND:VALUE[xSTEPS]`` -> (algo, config overrides, steps)."""
    algo, _, rest = point.rpartition("@")
    algo = algo or "ppo"
    head, _, steps = rest.rpartition("x")
    if head and steps.isdigit():
        rest = head
    else:
        steps = ""
    kind, _, value = rest.partition(":")
    if algo not in ("ppo", "grpo", "rloo") or not value:
        raise SystemExit(f"point {point!r}: expected [ppo|grpo|rloo@]KIND:VALUE[xSTEPS]")
    if kind == "fixed" and algo != "grpo":
        overrides: dict = {"kl_coef": float(value), "target_kl": None}
    elif kind == "target" and algo != "grpo":
        overrides = {"target_kl": float(value)}
    elif kind == "beta" and algo == "grpo":
        overrides = {"beta": float(value)}
    else:
        raise SystemExit(f"point {point!r}: {kind} does not apply to {algo}")
    return algo, overrides, int(steps) if steps else default_steps


def run_point(data: Path, folder: Path, point: str, default_steps: int) -> dict:
    from rlhfkit.demo import DemoConfig, demo_rl_config
    from rlhfkit.rl.grpo import GRPOConfig, run_grpo
    from rlhfkit.rl.ppo import PPOConfig, run_ppo
    from rlhfkit.rl.rloo import RLOOConfig, run_rloo
    from rlhfkit.rundir import latest_checkpoint, read_metrics

    algo, point_settings, steps = parse_point(point, default_steps)
    config_class, train = {"ppo": (PPOConfig, run_ppo), "grpo": (GRPOConfig, run_grpo), "rloo": (RLOOConfig, run_rloo)}[
        algo
    ]
    demo = DemoConfig(out=str(data), quick=True, algo=algo)
    if (folder / "adapter" / "adapter_config.json").exists():
        print(f"{point}: reusing {folder}", flush=True)
    elif latest_checkpoint(folder) is not None:
        train(config_class(resume=str(folder)))
    else:
        overrides = {"out": str(folder), "monitor_judge": "", "monitor_prompts": "", "save_every": 10}
        train(demo_rl_config(demo, data, steps, 16, **overrides, **point_settings))
    rows = read_metrics(folder)
    return {
        "steps": len(rows),
        "train_kl_last5": sum(r["kl"] for r in rows[-5:]) / min(5, len(rows)),
        "kl_coef_last": rows[-1].get("kl_coef", rows[-1].get("beta", float("nan"))),
        "seconds_per_step": sum(r["seconds"] for r in rows) / len(rows),
        "train_seconds": sum(r["seconds"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="output directory of `rlhf demo --quick` (prompts, reward model)")
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="[ALGO@]KIND:VALUE[xSTEPS]")
    parser.add_argument("--steps", type=int, default=40, help="RL steps per point (the quick demo's 40)")
    parser.add_argument("--cache", default=str(HERE / ".cache" / "frontier"), help="where runs are kept")
    parser.add_argument("--plot", default=str(HERE / "frontier.png"), help="where the plot goes")
    args = parser.parse_args()

    from rlhfkit.data import load_prompts
    from rlhfkit.evaluation import evaluate
    from rlhfkit.generation import SamplingParams

    data, cache = Path(args.data), Path(args.cache)
    for needed in ("prompts_ppo.jsonl", "prompts_heldout.jsonl", "reward_model/metrics.json"):
        if not (data / needed).exists():
            sys.exit(f"{data / needed} missing: run `rlhf demo --quick --out {data}` first")
    gflops = matmul_gflops()
    print(f"fp32 matmul: {gflops:.0f} GFLOP/s", flush=True)
    names = {p: p.replace(":", "-").replace(".", "_").replace("@", "-") for p in args.points}
    train = {p: run_point(data, cache / names[p], p, args.steps) for p in args.points}
    prompts = [r.prompt for r in load_prompts(str(data / "prompts_heldout.jsonl"))]
    metrics = evaluate(
        "smollm2-135m",
        [cache / names[p] for p in args.points],
        prompts,
        judges=["nontoxic"],
        reward_model=str(data / "reward_model"),
        params=SamplingParams(32, 0.7),
        seed=1,
        out=cache / "eval",
    )
    base = metrics["base"]
    tuned = metrics["tuned"] if len(args.points) > 1 else {names[args.points[0]]: metrics["tuned"]}
    results = []
    for point in args.points:
        t = tuned[names[point]]
        results.append(
            {
                "point": point,
                "toxicity": t["toxicity"]["mean"],
                "toxicity_cut": 1 - t["toxicity"]["mean"] / base["toxicity"]["mean"],
                "toxicity_diff_ci_high": metrics["comparison"][names[point]]["toxicity"]["difference"]["ci_high"]
                if len(args.points) > 1
                else metrics["comparison"]["toxicity"]["difference"]["ci_high"],
                "kl_from_base": t["kl_from_base"]["mean"],
                "distinct_2_ratio": t["distinct_2"] / base["distinct_2"],
                "deflection_delta": t.get("deflection_rate", float("nan")) - base.get("deflection_rate", float("nan")),
                "eos_ratio": t["eos_rate"] / base["eos_rate"] if base["eos_rate"] else float("nan"),
                "fluency_ratio": (t.get("fluency_ppl") or float("nan")) / (base.get("fluency_ppl") or float("nan")),
                **train[point],
            }
        )
    header = (
        f"| point | toxicity (base {base['toxicity']['mean']:.3f}) | cut | KL eval | KL train last 5 | "
        "final coef (beta) | distinct-2 ratio | deflection delta | EOS ratio | fluency ratio | steps | s/step | RL s |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in results:
        significant = "" if r["toxicity_diff_ci_high"] < 0 else " (n.s.)"
        lines.append(
            f"| {r['point']} | {r['toxicity']:.3f} | {r['toxicity_cut']:.0%}{significant} | {r['kl_from_base']:.2f} | "
            f"{r['train_kl_last5']:.2f} | {r['kl_coef_last']:.3f} | {r['distinct_2_ratio']:.2f} | "
            f"{r['deflection_delta']:+.2f} | {r['eos_ratio']:.2f} | {r['fluency_ratio']:.2f} | {r['steps']} | "
            f"{r['seconds_per_step']:.1f} | {r['train_seconds']:.0f} |"
        )
    gflops_end = matmul_gflops()
    print(
        f"fp32 matmul {gflops:.0f} GFLOP/s at the start, {gflops_end:.0f} at the end; "
        f"{args.steps} RL steps per point unless the point says; {len(prompts)} held-out prompts"
    )
    print("\n".join(lines))
    (cache / "frontier.json").write_text(
        json.dumps({"gflops_start": gflops, "gflops_end": gflops_end, "results": results}, indent=2)
    )
    plot(results, base["toxicity"]["mean"], Path(args.plot))
    print(f"wrote {args.plot} and {cache / 'frontier.json'}")


def plot(results: list[dict], base_toxicity: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([0.0], [base_toxicity], color="black", label="base")
    for r in results:
        ok = r["distinct_2_ratio"] >= 0.9 and r["deflection_delta"] <= 0.10
        ax.scatter([r["kl_from_base"]], [r["toxicity"]], color="tab:green" if ok else "tab:red")
        ax.annotate(
            f"{r['point']}\nd2 x{r['distinct_2_ratio']:.2f}, defl {r['deflection_delta']:+.2f}",
            (r["kl_from_base"], r["toxicity"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.axvline(3.0, color="grey", linestyle=":", label="KL bound (3 nats)")
    ax.axhline(base_toxicity / 2, color="grey", linestyle="--", label="50% toxicity cut")
    ax.set_xlabel("KL from base on held-out prompts (nats / response)")
    ax.set_ylabel("toxicity P(toxic), held-out mean")
    ax.set_title("Quick demo RL stage: toxicity vs KL (green: diversity and deflection within bounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
