"""The reference trainer's run options: packed batches, gradient accumulation, precision, every loss
option on the command line, the run-folder guard, and runs that survive damaged files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

from spo_kernels import PreferenceLossConfig  # noqa: E402
from training import TrainConfig, collate_pairs, tokenize_pair, train  # noqa: E402
from training.__main__ import main as cli_main  # noqa: E402
from training.config import MODEL_OWNED_LOSS_FIELDS  # noqa: E402
from training.data import collate_packed, load_preference_jsonl, write_preference_jsonl  # noqa: E402
from training.modeling import BuiltinModelSize, PolicyWithLoss, build_builtin_model  # noqa: E402
from training.task import make_pairs, make_problems  # noqa: E402
from training.tokenizer import CharTokenizer  # noqa: E402

from train_fixtures import TINY, data_file, read_metrics, tiny_config  # noqa: E402,F401


def assert_runs_close(a, b, rtol, atol, keys=("loss", "rewards/margins", "logps/chosen", "logps/rejected"),
                      weight_atol=1e-5):
    """Same logged metrics (``keys``, where logged) at every step, and the same weights at the end. AdamW's
    first updates are nearly sign(grad) * lr, so weights whose gradient is ~0 may move by ~lr on either
    side: the weights get an absolute tolerance well below one update (lr 1e-3), the metrics the tight one."""
    ra, rb = read_metrics(a.out_dir), read_metrics(b.out_dir)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in keys:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rtol, abs=atol), (x["step"], key)
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=weight_atol, msg=name)


# ---------------------------------------------------------------------------------------------
# packed (padding-free) batches
# ---------------------------------------------------------------------------------------------

def _float64_model(kind):
    tok = CharTokenizer()
    if kind == "llama-eager":
        return build_builtin_model(tok, BuiltinModelSize(32, 2, 2, 64), seed=1).double()
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()


@pytest.mark.parametrize("kind", ["llama-eager", "qwen2-sdpa"])
def test_packed_and_padded_give_the_same_loss_and_gradients(kind):
    tok = CharTokenizer()
    rows = make_pairs(make_problems(5, seed=11, max_terms=6), seed=12)
    pairs = [tokenize_pair(tok, r) for r in rows]
    padded = collate_pairs(pairs, range(5), tok.pad_token_id)
    packed = collate_packed(pairs, range(5))
    # Same sequences, in the same order, without the padding.
    assert packed.input_ids.shape[1] == int(padded.attention_mask.sum())
    assert torch.equal(packed.labels, padded.labels[padded.attention_mask.bool()])
    from training.modeling import SequenceLogps
    # Reference log-probs near the policy's, so that the SPO penalty is active for some pairs only.
    start = SequenceLogps(_float64_model(kind))(padded.input_ids, padded.labels, padded.attention_mask)
    ref_logps = start.double() + torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = PreferenceLossConfig(beta=0.5, spo_lambda=1.0)
    results = {}
    for name, inputs in (("padded", dict(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                                         labels=padded.labels)),
                         ("packed", dict(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                         labels=packed.labels, cu_seqlens=packed.cu_seqlens))):
        model = _float64_model(kind)
        out = PolicyWithLoss(model, config)(**inputs, ref_logps=ref_logps)
        out.loss.backward()
        results[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, grads_a), (b, grads_b) = results["padded"], results["packed"]
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.policy_logps, a.policy_logps, rtol=1e-10, atol=0)
    for key in a.metrics:
        torch.testing.assert_close(b.metrics[key], a.metrics[key], rtol=1e-9, atol=1e-12, msg=key)
    assert float(a.metrics["spo/active_fraction"]) not in (0.0, 1.0)  # both sides of the kink are exercised
    # Gradients, rel (norm): float64 rounding with SDPA; with eager attention HF takes the softmax in fp32
    # even for a float64 model, and padded rows sum it over more (masked) positions than packed ones: a few
    # fp32 roundings (seen: 3e-9 on one thread, 0 on two).
    grad_tol = {"llama-eager": 1e-7, "qwen2-sdpa": 1e-12}[kind]
    for n in grads_a:
        assert grads_a[n].abs().sum() > 0, n
        rel = float((grads_b[n] - grads_a[n]).norm() / grads_a[n].norm())
        assert rel <= grad_tol, (n, rel)


@pytest.mark.parametrize("objective", ["preference", "sft"])
def test_packed_training_run_matches_padded(data_file, tmp_path, objective):
    common = dict(objective=objective, spo_lambda=1.0 if objective == "preference" else 0.0, max_steps=3)
    padded = train(tiny_config(data_file, tmp_path / "padded", **common))
    packed = train(tiny_config(data_file, tmp_path / "packed", packed=True, **common))
    assert_runs_close(padded, packed, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(spo_lambda=1.0, spo_margin=0.1, reference="model"),
    dict(loss_type="ipo", beta=0.5),
    dict(objective="sft"),
], ids=["dpo+spo", "ipo", "sft"])
def test_gradient_accumulation_equals_the_large_batch(data_file, tmp_path, overrides):
    common = dict(batch_size=8, max_steps=3, max_grad_norm=0.5, **overrides)
    large = train(tiny_config(data_file, tmp_path / "large", **common))
    accumulated = train(tiny_config(data_file, tmp_path / "accum", grad_accum=4, **common))
    keys = ("loss", "grad_norm", "nll", "rewards/margins", "rewards/accuracies", "logps/chosen", "spo/penalty")
    assert_runs_close(large, accumulated, rtol=1e-5, atol=1e-6, keys=keys)


def test_grad_accum_must_divide_the_batch(data_file, tmp_path):
    with pytest.raises(ValueError, match="grad_accum"):
        tiny_config(data_file, tmp_path / "x", batch_size=6, grad_accum=4)


# ---------------------------------------------------------------------------------------------
# reference modes agree
# ---------------------------------------------------------------------------------------------

def test_reference_model_and_precomputed_cache_give_the_same_run(data_file, tmp_path):
    common = dict(spo_lambda=1.0, max_steps=3)
    cached = train(tiny_config(data_file, tmp_path / "cached", reference="precompute", **common))
    live = train(tiny_config(data_file, tmp_path / "live", reference="model", **common))
    assert [r["loss"] for r in read_metrics(cached.out_dir)] == [r["loss"] for r in read_metrics(live.out_dir)]
    for (name, p), (_, q) in zip(cached.model.named_parameters(), live.model.named_parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# device and precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "bf16-autocast"])
def test_bf16_runs_track_the_fp32_run(data_file, tmp_path, dtype):
    fp32 = train(tiny_config(data_file, tmp_path / "fp32", max_steps=2))
    run = train(tiny_config(data_file, tmp_path / dtype, dtype=dtype, max_steps=2))
    expected = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert all(p.dtype == expected for p in run.model.parameters())
    losses, ref = [r["loss"] for r in read_metrics(run.out_dir)], [r["loss"] for r in read_metrics(fp32.out_dir)]
    assert all(math.isfinite(x) for x in losses)
    # Step 1: policy = reference, loss log 2 up to bf16 rounding; then it tracks the fp32 run.
    assert losses[0] == pytest.approx(math.log(2), abs=2e-2)
    assert losses[1] == pytest.approx(ref[1], abs=5e-2)
    assert os.path.exists(os.path.join(run.out_dir, "final", "config.json"))


def test_cuda_without_a_gpu_is_a_clear_error(data_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA device"):
        train(tiny_config(data_file, tmp_path / "x", device="cuda"))


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "fp16", "dtype must be one of"), ("device", "tpu", "device must be one of"),
    ("dist", "deepspeed", "dist must be one of"), ("grad_accum", 0, "grad_accum must be >= 1"),
    ("loss_options", {"softcap": 3.0}, "softcap"), ("loss_options", {"beta": 0.3}, "field of its own"),
    ("loss_options", {"dpop_lambda": float("nan")}, "dpop_lambda must be finite"),
    ("loss_options", {"ld_alpha": 0.5}, "ld_alpha=0.5 with a loss that reads reference log-probs"),
])
def test_bad_config_values_are_named(data_file, tmp_path, field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_config(data_file, tmp_path / "x", **{field: value})


def test_distributed_mode_without_torchrun_is_refused(data_file, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        train(tiny_config(data_file, tmp_path / "x", dist="fsdp2"))


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

def _train_parser():
    import argparse
    from training.__main__ import add_train_flags
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    return parser


def test_every_loss_option_has_a_flag_with_help():
    parser = _train_parser()
    actions = {a.dest: a for a in parser._actions}
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    for field in dataclasses.fields(PreferenceLossConfig):
        if field.name in MODEL_OWNED_LOSS_FIELDS:
            continue
        dest = field.name if field.name in own else "loss_option__" + field.name
        assert dest in actions, field.name
        assert actions[dest].help and "default" in actions[dest].help, field.name
    from spo_kernels import LOSS_TYPES
    assert set(actions["loss_type"].choices) == set(LOSS_TYPES)
    assert set(actions["spo_anchor"].choices) == {"reference", "one_step"}
    assert set(actions["dtype"].choices) == {"fp32", "bf16", "bf16-autocast"}


def test_loss_options_from_the_command_line_reach_the_loss(data_file):
    from training.__main__ import config_from_args
    args = _train_parser().parse_args(["--data", data_file, "--loss-type", "dpop", "--dpop-lambda", "7",
                                       "--rdpo-alpha", "0.2", "--discopop-tau", "0.3", "--simpo-gamma", "0.9"])
    cfg = config_from_args(args)
    assert cfg.loss_options == {"dpop_lambda": 7.0, "rdpo_alpha": 0.2, "discopop_tau": 0.3}
    loss = cfg.loss_config()
    assert (loss.loss_type, loss.dpop_lambda, loss.rdpo_alpha, loss.discopop_tau, loss.simpo_gamma) == \
        (PreferenceLossConfig(loss_type="dpop").loss_type, 7.0, 0.2, 0.3, 0.9)
    defaults = config_from_args(_train_parser().parse_args(["--data", data_file]))
    assert defaults.loss_options == {} and defaults.loss_config() == PreferenceLossConfig()


@pytest.mark.parametrize("argv, message", [
    (["--loss-type", "dpo"], "invalid choice"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--discopop-tau", "0"], "discopop_tau must be > 0"),
])
def test_cli_rejects_bad_values_with_the_flag_named(data_file, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--data", data_file, "--out-dir", str(tmp_path / "x")] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_prints_what_it_wrote_without_progress(data_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", data_file, "--out-dir", str(out), "--max-steps", "2", "--batch-size", "4",
            "--builtin-hidden-size", "32", "--builtin-layers", "2", "--builtin-heads", "2", "--no-progress",
            "--num-threads", "1"]
    assert cli_main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "wrote" in lines[0] and str(out) in lines[0]
    assert "metrics.jsonl (2 steps)" in lines[0] and "final/" in lines[0] and "logps.png" in lines[0]


# ---------------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------------

def test_existing_run_folder_is_refused_unless_resume_or_overwrite(data_file, tmp_path):
    cfg = tiny_config(data_file, tmp_path / "run", max_steps=2)
    first = train(cfg)
    stamp = os.path.getmtime(os.path.join(cfg.out_dir, "metrics.jsonl"))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(cfg)
    assert os.path.getmtime(os.path.join(cfg.out_dir, "metrics.jsonl")) == stamp  # nothing touched
    again = train(cfg.replace(overwrite=True))
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == [1, 2]
    for (name, p), (_, q) in zip(first.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), name
    resumed = train(cfg.replace(max_steps=2), resume=True)  # nothing left to do: finishes at once
    assert resumed.step == 2
    # A folder with unrelated files is not a run folder.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    train(tiny_config(data_file, other, max_steps=1))


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------

def test_torn_last_metrics_line_does_not_stop_resume(data_file, tmp_path, capsys):
    common = dict(max_steps=6, spo_lambda=1.0, save_every=2)
    straight = train(tiny_config(data_file, tmp_path / "straight", **common))
    cfg = tiny_config(data_file, tmp_path / "killed", **common)

    def interrupt(step, record, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(cfg, on_step_end=interrupt).step == 3  # checkpoint of step 3
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    with open(path, "a") as f:
        # A later step logged after the checkpoint, then a line cut by a kill mid-write.
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n" + '{"step": 5, "loss": 0.6')
    capsys.readouterr()
    resumed = train(cfg, resume=True)
    assert "skipped 1 unreadable line(s) (line 5" in capsys.readouterr().err
    assert resumed.step == 6
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == list(range(1, 7))
    assert [r["loss"] for r in read_metrics(cfg.out_dir)] == [r["loss"] for r in read_metrics(straight.out_dir)]
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name


def test_non_utf8_data_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "1+1=", "chosen": "1+1=2#2", "rejected": "1+1=3#3"}).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([good, good, b'{"prompt": "1+1=", "chosen": "caf\xe9", "rejected": "x"}', good]))
    with pytest.raises(ValueError, match=r"pairs\.jsonl, line 3: not UTF-8 text \(byte 0xe9"):
        load_preference_jsonl(str(path))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "wrong-shape"])
def test_damaged_reference_cache_is_recomputed(data_file, tmp_path, capsys, damage):
    cfg = tiny_config(data_file, tmp_path / "run", max_steps=2, spo_lambda=1.0)
    first = train(cfg)
    first_losses = [r["loss"] for r in read_metrics(cfg.out_dir)]
    cache = os.path.join(cfg.out_dir, "ref_logps.pt")
    good = open(cache, "rb").read()
    if damage == "truncated":
        open(cache, "wb").write(good[:len(good) // 2])
    elif damage == "empty":
        open(cache, "wb").write(b"")
    elif damage == "garbage":
        open(cache, "wb").write(b"\x00not a torch file" * 10)
    else:
        state = torch.load(cache, weights_only=True)
        torch.save({"key": state["key"], "logps": state["logps"][:5]}, cache)
    capsys.readouterr()
    again = train(cfg.replace(overwrite=True))
    err = capsys.readouterr().err
    if damage != "wrong-shape":
        assert "reference cache" in err and "recomputing" in err
    assert open(cache, "rb").read() != b"" and torch.load(cache, weights_only=True)["logps"].shape == (24, 2)
    assert [r["loss"] for r in read_metrics(again.out_dir)] == first_losses
    for (name, p), (_, q) in zip(first.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), name


def test_a_model_that_scales_its_logits_is_refused():
    from training import lm_head
    model = build_builtin_model(CharTokenizer(), BuiltinModelSize(32, 2, 2, 64), seed=1)
    model.config.logit_scale = 0.0625  # as Cohere's config: logits * logit_scale
    with pytest.raises(ValueError, match="logit_scale"):
        lm_head(model)


def test_a_model_that_transforms_its_hidden_states_is_refused():
    """MiniCPM's ``dim_model_base`` rescales the hidden states before the head: refused, as the integration
    refuses it, never trained on wrong log-probs."""
    from training import lm_head
    model = build_builtin_model(CharTokenizer(), BuiltinModelSize(32, 2, 2, 64), seed=1)
    model.config.dim_model_base = 256
    with pytest.raises(NotImplementedError, match="dim_model_base"):
        lm_head(model)


def test_multi_loss_and_f_divergence_from_the_command_line(data_file, tmp_path):
    from spo_kernels import config as loss_config_module
    from training.__main__ import config_from_args
    if not hasattr(loss_config_module, "F_DIVERGENCES"):
        pytest.skip("this spo_kernels has no multi-loss / f-divergence options")
    actions = {a.dest: a for a in _train_parser()._actions}
    assert tuple(actions["loss_option__f_divergence_type"].choices) == loss_config_module.F_DIVERGENCES
    args = _train_parser().parse_args(["--data", data_file, "--out-dir", str(tmp_path / "run"), "--loss-type",
                                       "sigmoid", "sft", "--loss-weights", "1", "0.5", "--f-divergence-type",
                                       "js_divergence", "--max-steps", "2", "--batch-size", "4", "--no-progress",
                                       "--no-plot", "--num-threads", "1", "--builtin-hidden-size", "32",
                                       "--builtin-layers", "2", "--builtin-heads", "2"])
    cfg = config_from_args(args)
    loss = cfg.loss_config()
    assert loss.loss_type == ("sigmoid", "sft") and loss.loss_weights == (1.0, 0.5)
    assert loss.f_divergence_type == "js_divergence"
    result = train(cfg)
    records = read_metrics(result.out_dir)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # sigmoid (log 2 at the start, policy = reference) + 0.5 x the chosen completions' token-mean NLL.
    assert records[0]["loss"] == pytest.approx(math.log(2) + 0.5 * records[0]["nll"], rel=1e-5)


def test_wpo_weighting_runs_through_the_trainer(data_file, tmp_path):
    from spo_kernels import config as loss_config_module
    if "use_weighting" not in {f.name for f in dataclasses.fields(loss_config_module.PreferenceLossConfig)}:
        pytest.skip("this spo_kernels has no use_weighting")
    plain = train(tiny_config(data_file, tmp_path / "plain", max_steps=2))
    wpo = train(tiny_config(data_file, tmp_path / "wpo", max_steps=2, loss_options={"use_weighting": True}))
    a, b = read_metrics(plain.out_dir), read_metrics(wpo.out_dir)
    # WPO multiplies each pair's loss (log 2 at step 1, policy = reference) by a positive weight that is not 1.
    assert all(math.isfinite(r["loss"]) for r in b)
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert b[0]["loss"] > 0 and abs(b[0]["loss"] - a[0]["loss"]) > 1e-4
