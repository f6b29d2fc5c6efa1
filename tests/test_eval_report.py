"""`rlhf eval` end to end on tiny-random: the three files, their keys, and the report in a real browser."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.data import write_jsonl
from rlhfkit.generation import SamplingParams
from rlhfkit.rl.ppo import PPOConfig, run_ppo

ASSETS = Path(__file__).parent / "assets" / "token_reward.py"
CHROMIUM = "/usr/bin/chromium"
FAVOURED = "token_reward.py:favoured_share"  # a user judge's metric name: file and function


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short monitored PPO runs and a held-out prompt file (one with a <script> to escape)."""
    folder = tmp_path_factory.mktemp("eval")
    prompts = folder / "prompts.jsonl"
    topics = ["the sea", "a city", "music", "bread", "winter", "a train", "the moon", "a garden"]
    write_jsonl(prompts, [{"prompt": f"Write one line about {t}."} for t in topics * 2])
    held = folder / "held.jsonl"
    hostile = {"prompt": "<script>window.pwned = 1</script>"}
    write_jsonl(held, [{"prompt": f"Say something about {t}."} for t in topics] + [hostile])
    made = {"prompts": prompts, "held": held}
    for name, lr in (("run_a", 2e-3), ("run_b", 1e-3)):
        made[name] = folder / name
        run_ppo(
            PPOConfig(
                reward=f"{ASSETS}:favoured_share",
                prompts=str(prompts),
                out=str(folder / name),
                policy="tiny-random",
                max_steps=6,
                batch_size=8,
                mini_batch_size=4,
                ppo_epochs=2,
                max_new_tokens=6,
                trainable_layers=1,
                learning_rate=lr,
                missing_eos_penalty=None,
                save_every=0,
                monitor_judge="nontoxic",
                monitor_prompts=str(held),
                monitor_num_prompts=4,
                monitor_every=2,
                hacking_window=2,
                min_distinct_2=1.01,  # above any distinct-2: forces an alert into the report
            )
        )
    return made


def invoke(*args: str) -> object:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def test_eval_writes_metrics_samples_and_report(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    invoke("eval", "--base", "tiny-random", "--adapter", str(runs["run_a"]), "--prompts", str(runs["held"]),
           "--judge", "nontoxic", "--judge", f"{ASSETS}:favoured_share", "--out", str(out),
           "--max-new-tokens", "6", "--seed", "3")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("base", "tuned"):
        for key in (
            "nontoxic",
            "toxicity",
            FAVOURED,
            "response_length",
            "eos_rate",
            "distinct_1",
            "distinct_2",
            "deflection_rate",
            "fluency_ppl",
            "fluency_scorer",
        ):
            assert key in metrics[side], (side, key)
        assert set(metrics[side]["nontoxic"]) >= {"mean", "ci_low", "ci_high"}
        assert 0 <= metrics[side]["deflection_rate"] <= 1 and metrics[side]["fluency_ppl"] > 1
    # gemma3-270m when its wheels are installed, else the base model, and the file says which
    assert metrics["settings"]["fluency_scorer_model"] in ("gemma3-270m", "tiny-random")
    assert metrics["base"]["fluency_scorer"] == metrics["settings"]["fluency_scorer"]
    assert math.isfinite(metrics["tuned"]["kl_from_base"]["mean"])
    verdict = metrics["verdict"]
    assert verdict["color"] in ("green", "red") and verdict["summary"].startswith(verdict["color"])
    assert [b["name"] for b in verdict["bounds"]] == [
        "kl_from_base",
        "distinct_2_ratio",
        "deflection_rate_increase",
        "eos_rate_ratio",
        "fluency_ppl_ratio",
    ]
    assert verdict["improved"]["metric"] == "nontoxic"
    for key in ("nontoxic", "toxicity", FAVOURED):
        assert 0 <= metrics["comparison"][key]["win_rate"] <= 1
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    assert {"prompt", "base_completion", "tuned_completion", "base_nontoxic", f"tuned_{FAVOURED}"} <= set(rows[0])
    assert {"base_deflection", "tuned_deflection", "base_fluency_ppl", "tuned_fluency_ppl"} <= set(rows[0])
    assert isinstance(rows[0]["tuned_deflection"], bool)
    for png in ("training_curves.png", "reward_vs_kl.png", "score_histograms.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
    page = (out / "report.html").read_text()
    assert "<script" not in page  # the held-out <script> prompt, if shown, is escaped
    assert "diversity collapsed" in page  # the forced alert reached the report
    assert "Verdict: " in page and page.index("Verdict: ") < page.index("nontoxic judge")  # the verdict leads
    assert "deflection rate" in page and "fluency (perplexity under" in page and "EOS rate" in page
    assert page.count("data:image/png;base64,") == 3


def test_eval_compares_several_adapters_and_the_base(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    invoke("eval", "--base", "tiny-random", "--adapter", str(runs["run_a"]), "--adapter", str(runs["run_b"]),
           "--prompts", str(runs["held"]), "--num-samples", "4", "--out", str(out),
           "--max-new-tokens", "5")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tuned"]) == {"run_a", "run_b"} and set(metrics["comparison"]) == {"run_a", "run_b"}
    assert set(metrics["verdict"]) == {"run_a", "run_b"} and "bounds" in metrics["verdict"]["run_b"]
    assert "kl_from_base" in metrics["tuned"]["run_b"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"tuned_run_a_completion", "tuned_run_b_nontoxic"} <= set(rows[0])
    # The same seed for every model: each adapter's samples equal what it gives when evaluated alone.
    alone = tmp_path / "alone"
    invoke("eval", "--base", "tiny-random", "--adapter", str(runs["run_b"]), "--prompts", str(runs["held"]),
           "--num-samples", "4", "--out", str(alone), "--max-new-tokens", "5")  # fmt: skip
    alone_rows = [json.loads(line) for line in (alone / "samples.jsonl").read_text().splitlines()]
    assert [r["tuned_run_b_completion"] for r in rows] == [r["tuned_completion"] for r in alone_rows]
    assert [r["base_completion"] for r in rows] == [r["base_completion"] for r in alone_rows]


def test_eval_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--prompts", str(runs["held"]), "--out", str(tmp_path / "o"),
                                      "--base", "tiny-random", "--adapter", str(tmp_path / "missing")])  # fmt: skip
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_eval_runs_on_the_device_asked_for_and_records_it(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    invoke("eval", "--base", "tiny-random", "--adapter", str(runs["run_a"]), "--prompts", str(runs["held"]),
           "--num-samples", "3", "--max-new-tokens", "4", "--out", str(out),
           "--device", "cpu", "--dtype", "fp32")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["settings"]["device"], metrics["settings"]["dtype"]) == ("cpu", "float32")
    assert metrics["tuned"]["kl_from_base"]["n"] == 3


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is installed by `make install`")
def test_report_renders_in_chromium_without_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    out = tmp_path / "eval"
    invoke("eval", "--base", "tiny-random", "--adapter", str(runs["run_a"]), "--prompts", str(runs["held"]),
           "--out", str(out), "--max-new-tokens", "6")  # fmt: skip
    shutil.rmtree(out / "plots")  # the page must stand alone
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        assert len(images) == 3 and all(done and width > 100 for done, width in images), images
        assert page.locator("h1").inner_text() == "rlhfkit evaluation report"
        assert page.get_by_text("Headline").count() == 1
        assert page.evaluate("window.pwned === undefined")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []


def test_samples_table_shows_model_output_as_text() -> None:
    from rlhfkit.evaluation.report import _samples_table

    row = {"prompt": "<b>hi</b>", "base_completion": "<script>alert(1)</script>", "base_r": 0.1,
           "tuned_completion": "fine & <i>dandy</i>", "tuned_r": 0.9}  # fmt: skip
    table = _samples_table([row], "tuned", "r", "gains")
    assert "<script" not in table and "<b>" not in table and "<i>" not in table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in table and "fine &amp; &lt;i&gt;dandy" in table


def test_fluency_falls_back_to_the_base_model_and_says_so(runs: dict[str, Path], tmp_path: Path) -> None:
    from rlhfkit.evaluation import evaluate

    metrics = evaluate("tiny-random", runs["run_a"], ["Say hi.", "Name a colour.", "Count to three."],
                       params=SamplingParams(max_new_tokens=5, temperature=0.7), out=tmp_path,
                       fluency_scorer="no-such-scorer")  # fmt: skip
    settings = metrics["settings"]
    assert settings["fluency_scorer_model"] == "tiny-random"
    assert "no-such-scorer did not load" in settings["fluency_scorer"] and "base model" in settings["fluency_scorer"]
    assert settings["fluency_scorer_note"].startswith("no-such-scorer did not load")
    assert metrics["tuned"]["fluency_scorer"] == settings["fluency_scorer"]
    assert metrics["base"]["fluency_ppl"] > 1 and settings["fluency_seconds"]["score"] >= 0
    skipped = evaluate("tiny-random", runs["run_a"], ["Say hi."], params=SamplingParams(max_new_tokens=3),
                       fluency_scorer=None)  # fmt: skip
    assert "fluency_ppl" not in skipped["base"]
    ratio = next(b for b in skipped["verdict"]["bounds"] if b["name"] == "fluency_ppl_ratio")
    assert ratio["pass"] is None and "skipped" in ratio["text"]


def test_report_leads_with_the_verdict_and_escapes_deflections(tmp_path: Path) -> None:
    from rlhfkit.evaluation import verdict
    from rlhfkit.evaluation.report import write_report

    ci = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 2}
    side = {"nontoxic": ci, "response_length": ci, "eos_rate": 0.5, "distinct_1": 0.9, "distinct_2": 0.9,
            "deflection_rate": 0.0, "fluency_ppl": 10.0, "fluency_scorer": "gemma3-270m"}  # fmt: skip
    tuned = side | {"deflection_rate": 0.5, "fluency_ppl": 30.0, "kl_from_base": ci}
    comparison = {"nontoxic": {"win_rate": 0.5, "difference": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 2}}}
    red = verdict(side, tuned, comparison, "nontoxic")
    metrics = {"base": side, "tuned": tuned, "comparison": comparison, "verdict": red, "settings": {"base": "x"}}
    rows = [
        {"prompt": "<b>p</b>", "base_completion": "ok", "base_nontoxic": 0.5, "base_deflection": False,
         "tuned_completion": "<script>x</script> I'm here to help!", "tuned_nontoxic": 0.6, "tuned_deflection": True},
        {"prompt": "q", "base_completion": "fine", "base_nontoxic": 0.5, "base_deflection": False,
         "tuned_completion": "fine too", "tuned_nontoxic": 0.5, "tuned_deflection": False},
    ]  # fmt: skip
    page = write_report(tmp_path, metrics, rows, {}).read_text()
    assert "<script" not in page and "&lt;script&gt;x&lt;/script&gt; I&#x27;m here to help!" in page
    assert "Verdict: RED" in page and page.index("Verdict: RED") < page.index("nontoxic judge")
    assert "deflection rate tuned - base 0.5 &gt; 0.1" in page and "fluency perplexity tuned/base 3 &gt; 1.25" in page
    assert "<h2>Deflections</h2>" in page and "1 of 2 completions flagged" in page
    assert "I&#x27;m here to help" in page and "gemma3-270m" in page


def without_timings(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    del metrics["settings"]["fluency_seconds"]  # wall time, the only number that may differ
    return metrics


def test_eval_killed_at_random_points_then_run_again_equals_a_straight_run(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL `python -m rlhfkit eval` after a random number of sampled batches (2 draws, of 18:
    9 for the base, 9 for the tuned run), run it again onto the same output: metrics.json and
    samples.jsonl equal a straight run's (but for wall times), and no journal is left behind."""
    args = ["eval", "--base", "tiny-random", "--adapter", str(runs["run_a"]), "--prompts", str(runs["held"]),
            "--max-new-tokens", "6", "--batch-size", "1", "--seed", "3"]  # fmt: skip
    straight = tmp_path / "straight"
    invoke(*args, "--out", str(straight))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float sums as in-process
    killed_after = []
    for draw, target in enumerate(random.Random(11).sample(range(1, 18), 2)):
        out = tmp_path / f"killed{draw}"
        proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", *args, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

        def batches_done(folder: Path = out) -> int:
            return sum(len(j.read_bytes().splitlines()) - 1 for j in folder.glob("*.samples.partial"))

        while proc.poll() is None:
            if batches_done() >= target:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
        assert not (out / "metrics.json").exists()
        killed_after.append(batches_done())
        invoke(*args, "--out", str(out))
        assert (out / "samples.jsonl").read_bytes() == (straight / "samples.jsonl").read_bytes(), draw
        assert without_timings(out / "metrics.json") == without_timings(straight / "metrics.json"), draw
        assert not list(out.glob("*.partial"))
    assert min(killed_after) >= 1, killed_after
