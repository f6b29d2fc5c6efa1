"""Reward-hacking detectors on synthetic curves that do and do not diverge, and the monitor in PPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhfkit.rl.monitor import (
    detect,
    diversity_collapse,
    kl_runaway,
    kl_without_reward,
    length_runaway,
    monitor_points,
    reward_up_monitor_down,
    slope,
)


def curve(rewards: list[float], monitor: dict[int, float] | None = None, **columns: list[float]) -> list[dict]:
    """metrics.jsonl rows: one per step, monitor keys on the steps given."""
    rows = []
    for i, r in enumerate(rewards):
        row = {"step": i + 1, "reward_mean": r}
        for key, values in columns.items():
            row[key] = values[i]
        if monitor and i + 1 in monitor:
            row["monitor_score"] = monitor[i + 1]
        rows.append(row)
    return rows


def test_slope_is_the_least_squares_trend() -> None:
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert slope([3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert slope([5.0]) == 0.0


def test_monitor_points_average_the_reward_between_evaluations() -> None:
    rows = curve([0.0, 1.0, 2.0, 3.0], monitor={2: 0.9, 4: 0.8})
    assert monitor_points(rows) == [(2, 0.5, 0.9), (4, 2.5, 0.8)]


def test_reward_up_while_monitor_down_alerts() -> None:
    rewards = [0.1 * i for i in range(12)]
    falling = {3: 0.90, 6: 0.88, 9: 0.85, 12: 0.80}
    alert = reward_up_monitor_down(curve(rewards, falling), window=4, drop=0.02)
    assert alert is not None and alert.kind == "reward_up_monitor_down" and alert.step == 12
    assert "0.900 -> 0.800" in alert.message


def test_reward_and_monitor_rising_together_is_not_hacking() -> None:
    rewards = [0.1 * i for i in range(12)]
    rising = {3: 0.80, 6: 0.84, 9: 0.85, 12: 0.90}
    assert reward_up_monitor_down(curve(rewards, rising), window=4, drop=0.02) is None


def test_a_small_monitor_dip_or_a_flat_reward_is_not_hacking() -> None:
    rewards = [0.1 * i for i in range(12)]
    dip = {3: 0.90, 6: 0.895, 9: 0.89, 12: 0.885}  # falls, but by less than drop
    assert reward_up_monitor_down(curve(rewards, dip), window=4, drop=0.02) is None
    flat = [0.5 - 0.01 * i for i in range(12)]  # reward not rising: no divergence
    falling = {3: 0.90, 6: 0.88, 9: 0.85, 12: 0.80}
    assert reward_up_monitor_down(curve(flat, falling), window=4, drop=0.02) is None


def test_reward_monitor_divergence_needs_a_full_window() -> None:
    rewards = [0.1 * i for i in range(6)]
    assert reward_up_monitor_down(curve(rewards, {3: 0.9, 6: 0.5}), window=3, drop=0.02) is None


def test_length_runaway_both_ways() -> None:
    steady = [30.0 + (i % 3) for i in range(20)]
    assert length_runaway(curve([0.0] * 20, response_length=steady), window=5, ratio=2.0) is None
    growing = [10.0 * 1.2**i for i in range(20)]
    alert = length_runaway(curve([0.0] * 20, response_length=growing), window=5, ratio=2.0)
    assert alert is not None and alert.kind == "length_runaway"
    shrinking = [30.0] * 10 + [3.0] * 10
    assert length_runaway(curve([0.0] * 20, response_length=shrinking), window=5, ratio=2.0) is not None
    assert length_runaway(curve([0.0] * 6, response_length=growing[:6]), window=5, ratio=2.0) is None  # too early


def test_kl_runaway_and_negative_kl() -> None:
    calm = [0.5 * i for i in range(10)]  # ends at 4.5 nats
    assert kl_runaway(curve([0.0] * 10, kl=calm), window=3, bound=20.0) is None
    exploding = [2.0**i for i in range(10)]
    alert = kl_runaway(curve([0.0] * 10, kl=exploding), window=3, bound=20.0)
    assert alert is not None and alert.kind == "kl_runaway"
    negative = [-0.5 * i for i in range(10)]
    alert = kl_runaway(curve([0.0] * 10, kl=negative), window=3, bound=20.0)
    assert alert is not None and alert.kind == "negative_kl"


def test_kl_rising_while_the_penalised_score_is_flat_alerts() -> None:
    n = 10
    noise = [0.05 * (-1) ** i for i in range(n)]  # a flat score with batch noise
    drifting = curve([0.0] * n, kl=[0.4 * i for i in range(n)], score_penalized_mean=noise)
    alert = kl_without_reward(drifting, window=5)
    assert alert is not None and alert.kind == "kl_without_reward" and "0.80 -> 2.80" in alert.message
    earning = curve([0.0] * n, kl=[0.4 * i for i in range(n)], score_penalized_mean=[0.1 * i for i in range(n)])
    assert kl_without_reward(earning, window=5) is None  # the drift buys reward: the trade PPO makes
    steady = curve([0.0] * n, kl=[2.0 + 0.05 * i for i in range(n)], score_penalized_mean=noise)
    assert kl_without_reward(steady, window=5) is None  # KL held: not a drift
    assert kl_without_reward(drifting[:9], window=5) is None  # needs two full windows


def test_diversity_collapse_prefers_the_monitor_and_falls_back_to_rollouts() -> None:
    rows = curve([0.0] * 6, distinct_2=[0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    alert = diversity_collapse(rows, window=3, bound=0.4, ratio=0.0)
    assert alert is not None and "rollouts" in alert.message
    assert diversity_collapse(rows[:2], window=3, bound=0.4, ratio=0.0) is None  # too early
    rows[0]["monitor_distinct_2"] = 0.9
    rows[-1]["monitor_distinct_2"] = 0.8  # the held-out batch is still diverse: trust it
    assert diversity_collapse(rows, window=3, bound=0.4, ratio=0.5) is None


def test_diversity_collapse_relative_to_the_start() -> None:
    rows = curve([0.0] * 4, monitor={1: 0.9, 4: 0.9})
    rows[0]["monitor_distinct_2"], rows[3]["monitor_distinct_2"] = 0.91, 0.43  # the full demo's monitor
    alert = diversity_collapse(rows, window=3, bound=0.4, ratio=0.5)
    assert alert is not None and "0.91 -> 0.43" in alert.message
    assert diversity_collapse(rows, window=3, bound=0.4, ratio=0.4) is None  # above both bounds


def test_detect_is_quiet_on_a_healthy_run() -> None:
    n = 30
    rows = curve(
        [0.02 * i for i in range(n)],
        monitor={s: 0.8 + 0.003 * s for s in range(3, n + 1, 3)},
        response_length=[28.0 + (i % 4) for i in range(n)],
        kl=[0.2 * i for i in range(n)],
        distinct_2=[0.8] * n,
    )
    assert detect(rows, window=5, monitor_drop=0.02, length_ratio=2.0, kl_bound=20.0, min_distinct_2=0.4) == []


# ----------------------------------------------------------------------------------------------
# The monitor inside rlhf ppo (tiny-random)

ASSETS = Path(__file__).parent / "assets" / "token_reward.py"


def test_stop_on_hacking_keeps_the_monitors_best_weights(tmp_path: Path) -> None:
    from rlhfkit.data import write_jsonl
    from rlhfkit.rl.ppo import PPOConfig, run_ppo

    prompts = tmp_path / "prompts.jsonl"
    topics = ["the sea", "a city", "music", "bread"] * 8
    write_jsonl(prompts, [{"prompt": f"Write one line about {t}."} for t in topics])
    run = tmp_path / "run"
    summary = run_ppo(
        PPOConfig(
            reward=f"{ASSETS}:favoured_share",
            prompts=str(prompts),
            out=str(run),
            policy="tiny-random",
            max_steps=40,
            batch_size=32,
            mini_batch_size=16,
            ppo_epochs=4,
            max_new_tokens=8,
            trainable_layers=1,
            learning_rate=2e-3,
            missing_eos_penalty=None,
            save_every=0,
            monitor_judge=f"{ASSETS}:unfavoured_share",  # falls exactly as the reward rises
            monitor_prompts=str(prompts),
            monitor_num_prompts=16,
            monitor_every=2,
            hacking_window=3,
            stop_on_hacking=True,
        )
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stopped = rows[-1]["step"]
    assert stopped < 40 and "reward_up_monitor_down" in summary["stop"], summary
    assert "reward_up_monitor_down" in rows[-1]["alerts"]
    monitored = [r for r in rows if "monitor_score" in r]
    assert [r["step"] for r in monitored][:2] == [1, 2]
    assert all(0 <= r["monitor_score"] <= 1 and math.isfinite(r["monitor_distinct_2"]) for r in monitored)
    best = json.loads((run / "best" / "info.json").read_text())
    assert best["monitor_score"] == max(r["monitor_score"] for r in monitored)
    assert best["step"] < stopped
    # The final adapter is the best step's, not the last step's.
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    kept = load_file(run / "best" / "trainable.safetensors")
    last = load_file(next((run / "checkpoints").glob("step-*")) / "trainable.safetensors")
    name = next(k for k in final if "lora_B" in k)
    suffix = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
    source = next(k for k in kept if k.endswith(suffix))
    assert (final[name] == kept[source]).all()
    assert not (final[name] == last[source]).all()
    assert str(best["step"]) in summary["final_weights"]
