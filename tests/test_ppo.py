"""PPO end to end on tiny-random: padding invariance, learning, resume and kill-and-resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfkit.data import write_jsonl
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingParams, left_pad
from rlhfkit.models import load_causal_lm, load_tokenizer, right_pad
from rlhfkit.reward import new_head
from rlhfkit.rl import roles as roles_module
from rlhfkit.rl.ppo import PPOConfig, PPOTrainer, run_ppo
from rlhfkit.rl.roles import Roles, build_roles, is_value_param, response_logprobs

TOKEN_REWARD = f"{Path(__file__).parent / 'assets' / 'token_reward.py'}:favoured_share"


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def small_config(prompts: Path, out: Path, **overrides: object) -> PPOConfig:
    settings: dict = dict(
        reward=TOKEN_REWARD,
        prompts=str(prompts),
        out=str(out),
        policy="tiny-random",
        max_steps=4,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        trainable_layers=1,
        learning_rate=1e-3,
        missing_eos_penalty=None,
        save_every=2,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations() -> None:
    """Policy (checkpointed) and critic (never: its adapter is switched on only during its forward)
    on one trunk: the same log-probs, values and gradients with checkpointing on and off, and the
    checkpointed forward keeps fewer tensors for backward."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        roles, _ = build_roles("tiny-random", False, 4, 8, 2, critic=True, gradient_checkpointing=checkpointing)
        for name, param in roles.named_parameters():
            # peft starts B at 0 (every adapter would compute the same) and the critic's head is 0.
            if "lora_B" in name or name.startswith("value_head"):
                torch.nn.init.normal_(param, std=0.5)
        ids = torch.randint(0, 100, (3, 12))
        mask = torch.ones_like(ids)
        saved: list[int] = []

        def keep(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logp, values, _ = roles(ids, mask, None, 5, 0.7)
        (logp.sum() + values.sum()).backward()
        grads = {n: p.grad.clone() for n, p in roles.named_parameters() if p.requires_grad}
        results.append((logp.detach(), values.detach(), grads, sum(saved)))
    (logp0, values0, grads0, saved0), (logp1, values1, grads1, saved1) = results
    assert torch.equal(logp0, logp1) and torch.equal(values0, values1)
    assert grads0.keys() == grads1.keys() and any(is_value_param(n) for n in grads0)
    for name, grad in grads0.items():
        assert torch.allclose(grad, grads1[name], atol=1e-6), name
    assert saved1 < saved0


def test_padded_and_unpadded_sequences_get_the_same_logprobs() -> None:
    model, tok = load_causal_lm("tiny-random"), load_tokenizer("tiny-random")
    policy = Roles(model, new_head(model.config.hidden_size, 0), split=0)
    queries = [tok("a fairly long prompt with many words in it")["input_ids"], tok("short")["input_ids"]]
    responses = [tok(" one two three four")["input_ids"], tok(" five")["input_ids"]]
    q_ids, q_mask = left_pad(queries, tok.pad_token_id)
    r_ids, r_mask = right_pad(responses, tok.pad_token_id)
    ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        batched, values, _ = policy(ids, mask, None, q_ids.shape[1], 0.7)
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            one = torch.tensor([q + r])
            single, single_values, _ = policy(one, torch.ones_like(one), None, len(q), 0.7)
            assert torch.allclose(batched[i, : len(r)], single[0], atol=1e-5)
            assert torch.allclose(values[i, : len(r)], single_values[0], atol=1e-5)


def test_response_logprobs_use_the_temperature() -> None:
    model, tok = load_causal_lm("tiny-random"), load_tokenizer("tiny-random")
    ids = torch.tensor([tok("hello there friend")["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logp, _ = response_logprobs(model, hidden, ids, 1, temperature=0.5)
        expected = torch.log_softmax(model.lm_head(hidden[:, :-1]) / 0.5, -1).gather(-1, ids[:, 1:, None])
    assert torch.allclose(logp, expected.squeeze(-1), atol=1e-6)


@pytest.mark.parametrize("slice_tokens", [1, 5, 10_000])
def test_sliced_checkpointed_logprobs_equal_the_plain_head(monkeypatch: pytest.MonkeyPatch, slice_tokens: int) -> None:
    """The LM head in slices, recomputed in backward, gives the plain head's log-probs, entropies and
    gradients (to the hidden states and to the head's own weight, as full fine-tuning trains it)."""
    monkeypatch.setattr(roles_module, "LOGIT_TOKENS", slice_tokens)
    model = load_causal_lm("tiny-random")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (5, 9))
    hidden = torch.randn(5, 9, model.config.hidden_size, requires_grad=True)
    weights = torch.randn(5, 6)

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(model.lm_head(hidden[:, 2:-1]) / 0.7, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, ids[:, 3:, None]).squeeze(-1), entropy

    results = []
    for compute in (plain, lambda: response_logprobs(model, hidden, ids, 3, 0.7, with_entropy=True)):
        hidden.grad, model.lm_head.weight.grad = None, None
        logp, entropy = compute()
        (logp * weights).sum().backward()
        results.append((logp.detach(), entropy.detach(), hidden.grad.clone(), model.lm_head.weight.grad.clone()))
    for ours, expected in zip(results[1], results[0], strict=True):
        # fp32 sums in another order (the matmul blocks by slice size, and kernels differ by CPU):
        # equal to a relative 1e-4, measured 1.2e-5 on an AMD EPYC host.
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_ppo_raises_a_token_reward_with_bounded_kl(tmp_path: Path, prompts: Path) -> None:
    cfg = small_config(
        prompts,
        tmp_path / "run",
        max_steps=40,
        batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=8,
        learning_rate=2e-3,
        save_every=0,
    )
    summary = run_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["reward_mean"] for r in rows[:10]) / 10
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    assert last > first + 0.05, (first, last)
    assert all(math.isfinite(r["kl"]) and r["kl"] < 30 for r in rows)
    assert summary["steps"] == 40
    for key in (
        "step",
        "reward_mean",
        "reward_std",
        "kl",
        "kl_coef",
        "entropy",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "response_length",
        "eos_rate",
        "seconds",
    ):
        assert key in rows[-1]
    for name in (
        "config.yaml",
        "README.md",
        "value_head.safetensors",
        "value/value/adapter_model.safetensors",
        "adapter/adapter_model.safetensors",
    ):
        assert (tmp_path / "run" / name).exists(), name


def test_resume_reproduces_a_straight_run(tmp_path: Path, prompts: Path) -> None:
    # The monitor samples with its own dice: running it must not change the training run's.
    monitor = {"monitor_judge": TOKEN_REWARD, "monitor_prompts": str(prompts), "monitor_every": 1}
    run_ppo(small_config(prompts, tmp_path / "straight", **monitor))
    run_ppo(small_config(prompts, tmp_path / "resumed", max_steps=2, **monitor))
    assert len(read_metrics(tmp_path / "resumed")) == 2
    run_ppo(PPOConfig(resume=str(tmp_path / "resumed"), max_steps=4))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert all("monitor_score" in r for r in resumed)
    plain = tmp_path / "plain"
    run_ppo(small_config(prompts, plain))
    assert [r["reward_mean"] for r in read_metrics(plain)] == [r["reward_mean"] for r in straight]
    skip = {"seconds", "time_generate", "time_score", "time_train", "time_monitor"}
    for a, b in zip(straight, resumed, strict=True):
        for key in a.keys() - skip:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_new_run_refuses_an_existing_run_directory(tmp_path: Path, prompts: Path) -> None:
    run_ppo(small_config(prompts, tmp_path / "run", max_steps=1))
    with pytest.raises(RlhfkitError, match="--resume"):
        run_ppo(small_config(prompts, tmp_path / "run", max_steps=1))


def test_killed_run_resumes_and_completes(tmp_path: Path, prompts: Path) -> None:
    run = tmp_path / "run"
    args = [
        "ppo",
        "--policy",
        "tiny-random",
        "--reward",
        TOKEN_REWARD,
        "--prompts",
        str(prompts),
        "--out",
        str(run),
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--ppo-epochs",
        "2",
        "--max-new-tokens",
        "6",
        "--trainable-layers",
        "1",
        "--missing-eos-penalty",
        "off",
        "--save-every",
        "1",
    ]
    cli = [sys.executable, "-c", "from rlhfkit.cli import main; main()"]
    proc = subprocess.Popen(
        [*cli, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step-000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob("step-*")), "no checkpoint before the kill"
    done = subprocess.run([*cli, "ppo", "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_bad_reward_spec_is_a_clear_error(tmp_path: Path, prompts: Path) -> None:
    with pytest.raises(RlhfkitError, match="judge:NAME"):
        run_ppo(small_config(prompts, tmp_path / "run", reward="no-such-dir"))
    with pytest.raises(RlhfkitError, match="missing required option"):
        run_ppo(PPOConfig(prompts=str(prompts)))


def test_ppo_with_a_shared_backbone_reward_model(tmp_path: Path, prompts: Path) -> None:
    """The reward model's adapter rides on the policy's base; its weights never change."""
    from rlhfkit.reward import RewardTrainConfig, train_reward_model

    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"prompt": f"p{i}", "chosen": "good kind words", "rejected": f"bad {i}"} for i in range(24)])
    train_reward_model(
        RewardTrainConfig(data=str(prefs), out=str(tmp_path / "rm"), model="tiny-random", trainable_layers=1, epochs=1),
        show_summary=False,
    )
    cfg = small_config(prompts, tmp_path / "run", reward=str(tmp_path / "rm"), max_steps=2)
    trainer = PPOTrainer(cfg)
    reward_before = {k: v.clone() for k, v in trainer.core.trunk.named_parameters() if ".reward." in k}
    assert reward_before, "the reward adapter should be loaded onto the policy's base"
    # the value head starts as the reward head, rescaled to the normalised reward PPO optimises
    info = trainer.reward.info
    assert torch.allclose(trainer.core.value_head.weight, info.head.weight / info.score_std)
    assert torch.allclose(trainer.core.value_head.bias, (info.head.bias - info.score_mean) / info.score_std)
    trainer.train()
    for key, value in trainer.core.trunk.named_parameters():
        if key in reward_before:
            assert torch.equal(value, reward_before[key]), key
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["reward_mean"]) for r in rows)


def test_resume_takes_only_max_steps(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match="only --max-steps"):
        run_ppo(PPOConfig(resume=str(tmp_path), learning_rate=0.5))


def _train_reward(tmp_path: Path, **overrides: object) -> Path:
    from rlhfkit.reward import RewardTrainConfig, train_reward_model

    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"prompt": f"p{i}", "chosen": "good kind words", "rejected": f"bad {i}"} for i in range(24)])
    settings: dict = dict(data=str(prefs), out=str(tmp_path / "rm"), model="tiny-random", trainable_layers=1, epochs=1)
    settings.update(overrides)
    train_reward_model(RewardTrainConfig(**settings), show_summary=False)
    return tmp_path / "rm"


def test_ppo_with_a_linear_probe_reward_model(tmp_path: Path, prompts: Path) -> None:
    rm = _train_reward(tmp_path, lora_r=0)
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", reward=str(rm), max_steps=1))
    assert trainer.reward.model is None and trainer.reward.adapter_dir is None  # read on the shared base
    trainer.train()
    assert math.isfinite(read_metrics(tmp_path / "run")[0]["reward_mean"])


def test_ppo_with_a_separate_reward_model_scores_like_the_reward_cli(tmp_path: Path, prompts: Path) -> None:
    from rlhfkit.reward import load_reward_model, score_texts

    rm = _train_reward(tmp_path, full=True)
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", reward=str(rm), max_steps=1))
    assert trainer.reward.model is not None
    rollout, _ = trainer.rollout([0, 1, 2])
    model, tok, metrics = load_reward_model(rm)
    expected = torch.tensor(score_texts(model, tok, rollout.prompts, rollout.texts))
    torch.testing.assert_close(rollout.scores, (expected - metrics["score_mean"]) / metrics["score_std"])


@pytest.mark.parametrize("pooling", ["last", "last+mean"])
def test_shared_reward_adapter_scores_like_the_reward_model(tmp_path: Path, prompts: Path, pooling: str) -> None:
    """The cached-trunk reward path gives the scores `rlhf reward score` gives for the same tokens,
    pooled over the same completion span."""
    from rlhfkit.reward import load_reward_model, score_sequences

    rm = _train_reward(tmp_path, pooling=pooling)
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", reward=str(rm), max_steps=1))
    assert trainer.reward.adapter_dir is not None and trainer.reward.info.pooling == pooling
    rollout, _ = trainer.rollout([0, 1, 2])
    model, tok, metrics = load_reward_model(rm)
    eos = tok.eos_token_id
    rows, starts = [], []
    for ids, mask in zip(rollout.ids, rollout.mask, strict=True):
        tokens = ids[mask.bool()].tolist()
        rows.append(tokens if tokens[-1] == eos else [*tokens, eos])
        starts.append(int(mask[: rollout.query_len].sum()))
    expected = torch.tensor(score_sequences(model, rows, tok.pad_token_id, starts=starts))
    torch.testing.assert_close(
        rollout.scores, (expected - metrics["score_mean"]) / metrics["score_std"], atol=1e-4, rtol=1e-4
    )


def test_full_fine_tune_on_a_tied_model_checkpoints_and_resumes(tmp_path: Path, prompts: Path) -> None:
    """--full keeps a reference copy; a tied embedding/LM head must survive checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("tiny-random")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    cfg = small_config(prompts, tmp_path / "run", policy=str(tmp_path / "tied"), full=True, max_steps=2, save_every=1)
    run_ppo(cfg)
    run_ppo(PPOConfig(resume=str(tmp_path / "run"), max_steps=3))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "model" / "config.json").exists()

    from rlhfkit.evaluation import evaluate

    metrics = evaluate(str(tmp_path / "tied"), tmp_path / "run", ["Say hi."] * 3, judges=["nontoxic"],
                       params=SamplingParams(4, 0.7))  # fmt: skip
    assert math.isfinite(metrics["tuned"]["kl_from_base"]["mean"])


def test_resume_from_a_moved_run_directory(tmp_path: Path, prompts: Path) -> None:
    import shutil

    run_ppo(small_config(prompts, tmp_path / "before", max_steps=2))
    shutil.move(tmp_path / "before", tmp_path / "after")
    run_ppo(PPOConfig(resume=str(tmp_path / "after"), max_steps=3))
    assert [r["step"] for r in read_metrics(tmp_path / "after")] == [1, 2, 3]
    assert not (tmp_path / "before").exists()


def test_optimised_rollout_matches_plain_forward_passes(tmp_path: Path, prompts: Path) -> None:
    """Cached lower layers, response-only logits and the adapters-off reference give what a plain
    full forward of separate policy and reference models gives: speed never costs correctness."""
    from rlhfkit.models import position_ids_from_mask

    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", trainable_layers=1, max_new_tokens=8))
    assert trainer.split == 1  # the lower layer is cached
    rollout, _ = trainer.rollout(trainer.stream.take(8))
    trainer.ppo_step(rollout)  # LoRA B starts at zero: one update makes policy and reference differ
    r, _ = trainer.rollout(trainer.stream.take(8))
    core, qlen, rmask = trainer.core, r.query_len, r.response_mask.bool()
    positions = position_ids_from_mask(r.mask)
    reference = load_causal_lm("tiny-random")

    def plain_logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=r.ids, attention_mask=r.mask, position_ids=positions).logits
        logp = torch.log_softmax(logits[:, qlen - 1 : -1] / trainer.cfg.temperature, -1)
        return logp.gather(-1, r.ids[:, qlen:, None]).squeeze(-1)

    policy_plain, ref_plain = plain_logprobs(core.trunk), plain_logprobs(reference)
    assert torch.allclose(r.logprobs[rmask], policy_plain[rmask], atol=1e-4)
    assert torch.allclose(r.ref_logprobs[rmask], ref_plain[rmask], atol=1e-4)
    assert not torch.allclose(policy_plain[rmask], ref_plain[rmask], atol=1e-3)
    with torch.no_grad():
        _, values, _ = core(r.ids, r.mask, None, qlen, trainer.cfg.temperature)  # no cached layers
    assert torch.allclose(r.values[rmask], values[rmask], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The critic, the controllers and the no-signal guard (issue 11's review of the trainer)


def _policy_state(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.core.trunk.named_parameters() if ".default." in k}


def test_value_loss_alone_never_moves_the_policy(tmp_path: Path, prompts: Path, monkeypatch) -> None:
    """The value function has its own adapter: with the policy loss switched off, a step changes the
    critic and leaves every policy weight (and so the KL) exactly where it was."""
    import rlhfkit.rl.ppo as trainer_module

    real = trainer_module.policy_loss

    def no_policy_loss(*args, **kwargs):
        loss, clip_frac, approx_kl = real(*args, **kwargs)
        return loss * 0.0, clip_frac, approx_kl

    monkeypatch.setattr(trainer_module, "policy_loss", no_policy_loss)
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", learning_rate=1e-2))
    policy_before = _policy_state(trainer)
    value_before = [p.detach().clone() for p in trainer.value_params]
    for _ in range(3):
        rollout, _ = trainer.rollout(trainer.stream.take(8))
        trainer.ppo_step(rollout)
        trainer.step += 1
    for key, value in _policy_state(trainer).items():
        assert torch.equal(value, policy_before[key]), key
    assert any(not torch.equal(p, q) for p, q in zip(trainer.value_params, value_before, strict=True))
    rollout, _ = trainer.rollout(trainer.stream.take(8))
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(-1)
    assert float(kl.abs().max()) < 1e-4


def test_critic_without_a_reward_head_starts_at_the_mean_score(tmp_path: Path, prompts: Path) -> None:
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", max_steps=1))
    assert float(trainer.core.value_head.weight.detach().abs().sum()) == 0.0
    rollout, _ = trainer.rollout(trainer.stream.take(8))
    assert float(trainer.core.value_head.bias.detach()) == pytest.approx(float(rollout.penalized.mean()), abs=1e-6)
    torch.testing.assert_close(rollout.values, torch.full_like(rollout.values, float(rollout.penalized.mean())))


def test_critic_warmup_updates_the_value_only(tmp_path: Path, prompts: Path) -> None:
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", critic_warmup_steps=2, max_steps=3, save_every=0))
    before = _policy_state(trainer)
    rows = []
    for _ in range(2):
        rollout, _ = trainer.rollout(trainer.stream.take(8))
        rows.append(trainer.ppo_step(rollout))
        trainer.step += 1
    assert [r["policy_updated"] for r in rows] == [0, 0]
    assert all(torch.equal(v, before[k]) for k, v in _policy_state(trainer).items())
    rollout, _ = trainer.rollout(trainer.stream.take(8))
    assert trainer.ppo_step(rollout)["policy_updated"] == 1
    assert any(not torch.equal(v, before[k]) for k, v in _policy_state(trainer).items())


def test_target_approx_kl_stops_the_epochs_early(tmp_path: Path, prompts: Path) -> None:
    full = PPOTrainer(small_config(prompts, tmp_path / "full", learning_rate=1e-2))
    rollout, _ = full.rollout(full.stream.take(8))
    assert full.ppo_step(rollout)["updates"] == 2 * 2  # ppo_epochs x (batch / mini-batch)
    early = PPOTrainer(small_config(prompts, tmp_path / "early", learning_rate=1e-2, target_approx_kl=1e-12))
    rollout, _ = early.rollout(early.stream.take(8))
    early.ppo_step(rollout)  # the first mini-batch starts at ratio 1: approx KL 0, nothing stops
    rollout, _ = early.rollout(early.stream.take(8))
    row = early.ppo_step(rollout)
    assert 1 <= row["updates"] < 4


def test_scores_without_signal_skip_the_policy_update_and_warn_once(
    tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture
) -> None:
    """One-token answers never reach EOS: the replace-mode EOS penalty gives all the same -1."""
    cfg = small_config(prompts, tmp_path / "run", max_new_tokens=1, missing_eos_penalty=-1.0, max_steps=3, save_every=0)
    trainer = PPOTrainer(cfg)
    before = _policy_state(trainer)
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert all(r["eos_rate"] == 0 and r["score_penalized_std"] == 0 for r in rows)
    assert [r["policy_updated"] for r in rows] == [0, 0, 0]
    assert all(torch.equal(v, before[k]) for k, v in _policy_state(trainer).items())
    err = capsys.readouterr().err
    assert err.count("carry no signal") == 1
    assert "--max-new-tokens" in err and "--missing-eos-penalty off" in err
    # subtract mode keeps the reward's ranking among cut responses: the policy learns
    run_ppo(small_config(prompts, tmp_path / "sub", max_new_tokens=1, missing_eos_penalty=-1.0,
                         eos_penalty_mode="subtract", max_steps=2, save_every=0))  # fmt: skip
    assert [r["policy_updated"] for r in read_metrics(tmp_path / "sub")] == [1, 1]


def test_metrics_that_show_failure_are_logged(tmp_path: Path, prompts: Path) -> None:
    run_ppo(small_config(prompts, tmp_path / "run", max_steps=2, lr_schedule="linear", save_every=0))
    rows = read_metrics(tmp_path / "run")
    for key in ("score_penalized_std", "advantage_std_raw", "explained_variance", "learning_rate", "updates"):
        assert all(key in r for r in rows), key
    # the rate the optimizer used at each step, not the next one: linear decay from 1e-3 over 2 steps
    assert [r["learning_rate"] for r in rows] == pytest.approx([1e-3, 5e-4])


def test_value_adapter_starts_as_the_reward_adapter(tmp_path: Path, prompts: Path) -> None:
    rm = _train_reward(tmp_path)
    trainer = PPOTrainer(small_config(prompts, tmp_path / "run", reward=str(rm), max_steps=1))
    params = dict(trainer.core.trunk.named_parameters())
    reward_keys = [k for k in params if ".reward." in k]
    assert reward_keys
    for key in reward_keys:
        assert torch.equal(params[key.replace(".reward.", ".value.")], params[key]), key
    assert all(params[k.replace(".reward.", ".value.")].requires_grad for k in reward_keys)
    assert not any(params[k].requires_grad for k in reward_keys)


def test_metrics_unchanged_by_the_trainer_redesign(tmp_path: Path, prompts: Path) -> None:
    """The PPO loop moved from one 1100-line trainer into ``rlhfkit.rl`` (roles, rollout, scoring, run,
    ppo); the asset holds the metrics the old trainer wrote for this exact run (seeded, adaptive KL
    controller on): every number must come out the same."""
    expected = json.loads((Path(__file__).parent / "assets" / "ppo_metrics_before_redesign.json").read_text())
    cfg = small_config(prompts, tmp_path / "run", max_steps=3, save_every=0, target_kl=1.0, kl_horizon=2.0)
    run_ppo(cfg)
    rows = [
        {k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds"}
        for r in read_metrics(Path(cfg.out))
    ]
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
    for row, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["step"], key)
