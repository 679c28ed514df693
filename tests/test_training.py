"""The reference trainer (training/): runs on CPU, resumes bit-for-bit, rejects bad data by line,
and computes SPO's one-step anchor exactly as a direct copy-step-evaluate would."""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

from training import (TrainConfig, collate_pairs, load_preference_jsonl, one_step_anchor,  # noqa: E402
                      tokenize_pair, train)
from training.__main__ import main as cli_main  # noqa: E402
from training.data import write_preference_jsonl  # noqa: E402
from training.modeling import BuiltinModelSize, build_builtin_model  # noqa: E402
from training.task import make_pairs, make_problems  # noqa: E402
from training.tokenizer import CharTokenizer  # noqa: E402

from train_fixtures import TINY, data_file, read_metrics, tiny_config  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# the loop runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(),                                                                  # DPO, cached reference
    dict(spo_lambda=1.0, reference="model"),                                 # DPO+SPO, frozen reference model
    dict(spo_lambda=1.0, spo_anchor="one_step", spo_alpha=0.5, spo_normalize="sum"),
    dict(objective="sft", plot=True),
], ids=["dpo-precompute", "spo-reference-model", "spo-one-step", "sft"])
def test_trainer_runs_a_few_steps(data_file, tmp_path, overrides):
    cfg = tiny_config(data_file, tmp_path / "run", **overrides)
    before = {n: p.detach().clone() for n, p in build_builtin_model(
        CharTokenizer(), BuiltinModelSize(32, 2, 2, 64), seed=cfg.seed).named_parameters()}
    result = train(cfg)
    assert result.status == "finished" and result.step == 3
    records = read_metrics(cfg.out_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    if cfg.objective == "preference":
        assert {"rewards/margins", "logps/chosen", "logps/rejected"} <= set(records[0])
        # SPEC 6: the SPO metrics are logged exactly when SPO is on.
        assert ("spo/penalty" in records[0]) == (cfg.spo_lambda > 0)
        # Before the first update the policy is the reference: zero margin, loss log(2).
        assert records[0]["loss"] == pytest.approx(math.log(2) + (records[0]["spo/penalty"]
                                                                  if cfg.spo_lambda else 0.0), abs=1e-5)
    moved = any(not torch.equal(before[n], p) for n, p in result.model.named_parameters())
    assert moved
    assert os.path.exists(os.path.join(cfg.out_dir, "final", "config.json"))
    if cfg.plot:
        assert os.path.getsize(os.path.join(cfg.out_dir, "logps.png")) > 0


def test_cli_train_then_reuses_reference_cache(data_file, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--data", data_file, "--out-dir", str(out), "--max-steps", "2", "--batch-size", "4",
            "--builtin-hidden-size", "32", "--builtin-layers", "2", "--builtin-heads", "2", "--no-progress",
            "--no-plot", "--num-threads", "1", "--spo-lambda", "1.0"]
    assert cli_main(args) == 0
    cache = out / "ref_logps.pt"
    stamp = os.path.getmtime(cache)
    assert cli_main(args + ["--overwrite"]) == 0
    assert os.path.getmtime(cache) == stamp  # same data and starting model: not recomputed


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_resume_after_interruption_is_bitwise_identical(data_file, tmp_path, signum):
    # 7 steps over 24 pairs in batches of 4 crosses an epoch boundary; warmup + decay exercises the scheduler.
    common = dict(max_steps=8, spo_lambda=1.0, warmup_steps=2, lr_schedule="linear", weight_decay=0.01,
                  save_every=100)
    straight = train(tiny_config(data_file, tmp_path / "straight", **common))

    cfg = tiny_config(data_file, tmp_path / "interrupted", **common)

    def interrupt(step, record, model):
        if step == 7:
            os.kill(os.getpid(), signum)

    stopped = train(cfg, on_step_end=interrupt)
    assert stopped.status == "interrupted" and stopped.step == 7 and stopped.stop_signal == signum
    resumed = train(cfg, resume=True)
    assert resumed.status == "finished" and resumed.step == 8

    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == list(range(1, 9))
    assert [r["loss"] for r in read_metrics(cfg.out_dir)] == [r["loss"] for r in read_metrics(straight.out_dir)]


def test_resume_refuses_a_different_configuration(data_file, tmp_path):
    cfg = tiny_config(data_file, tmp_path / "run", max_steps=2)
    train(cfg)
    with pytest.raises(ValueError, match="beta"):
        train(cfg.replace(beta=0.3, max_steps=4), resume=True)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "1+2=", "chosen": "3"', "not valid JSON"),
    ('{"prompt": "1+2=", "chosen": "1+2=3#3"}', "missing field"),
    ('["1+2=", "3", "4"]', "JSON object"),
    ('{"prompt": "1+2=", "chosen": "1+2=3#3", "rejected": 4}', "'rejected' must be a string"),
])
def test_bad_jsonl_line_is_reported_with_its_line_number(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "1+1=", "chosen": "1+1=2#2", "rejected": "1+1=3#3"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([good, "", good, bad_line, good]) + "\n")
    with pytest.raises(ValueError, match=rf"pairs\.jsonl, line 4: .*{message}"):
        load_preference_jsonl(str(path))
    with pytest.raises(ValueError, match="line 4"):
        train(tiny_config(str(path), tmp_path / "run"))


def test_tokenization_follows_trl():
    tok = CharTokenizer()
    pair = tokenize_pair(tok, {"prompt": "1+2=", "chosen": "3", "rejected": "45"})
    assert pair.prompt_ids == tok.encode("1+2=")
    assert pair.chosen_ids == tok.encode("3") + [tok.eos_token_id]
    batch = collate_pairs([pair], [0], tok.pad_token_id)
    assert batch.input_ids.shape == (2, 7)
    # Position t predicts token t+1; only completion targets (and EOS) count.
    assert batch.labels[0].tolist() == [-100, -100, -100] + tok.encode("3") + [tok.eos_token_id] + [-100] * 2
    assert batch.labels[1].tolist() == [-100, -100, -100] + tok.encode("45") + [tok.eos_token_id, -100]
    assert batch.attention_mask.tolist() == [[1] * 6 + [0], [1] * 7]


# ---------------------------------------------------------------------------------------------
# model side: the fused path sees what the model's own LM head would
# ---------------------------------------------------------------------------------------------

def _tiny_hf_model(kind):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config
    common = dict(vocab_size=CharTokenizer().vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    config = {
        "llama-tied": lambda: LlamaConfig(tie_word_embeddings=True, **common),
        "qwen2-untied": lambda: Qwen2Config(tie_word_embeddings=False, **common),
        "gemma2-softcap": lambda: Gemma2Config(head_dim=16, final_logit_softcapping=5.0, **common),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double()


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2-untied", "gemma2-softcap"])
def test_fused_sequence_logprobs_match_the_models_own_logits(kind):
    from training import lm_head, sequence_logprobs
    model = _tiny_hf_model(kind)
    head = lm_head(model)
    assert (head.weight is model.get_input_embeddings().weight) == (kind != "qwen2-untied")
    assert head.softcap == (5.0 if kind == "gemma2-softcap" else None)
    tok = CharTokenizer()
    rows = make_pairs(make_problems(2, seed=7), seed=8)
    batch = collate_pairs([tokenize_pair(tok, r) for r in rows], range(2), tok.pad_token_id)
    seq = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
    expected, counts = _naive_chosen_logps(model, batch, 4)  # all 4 rows
    torch.testing.assert_close(seq.logps.double(), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(seq.counts, counts)


# ---------------------------------------------------------------------------------------------
# SPO one-step anchor
# ---------------------------------------------------------------------------------------------

def _naive_chosen_logps(model, batch, P):
    """Full logits (the model's own LM head, softcap included) + log_softmax + gather: the oracle's
    summed log-probs and counts of the first P rows."""
    logits = model(input_ids=batch.input_ids[:P], attention_mask=batch.attention_mask[:P]).logits
    labels = batch.labels[:P]
    mask = labels != -100
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(1), mask.sum(1)


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_one_step_anchor_matches_a_direct_sft_step(normalize):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = build_builtin_model(tok, BuiltinModelSize(32, 2, 2, 64), seed=1).double()
    rows = make_pairs(make_problems(3, seed=5), seed=6)
    batch = collate_pairs([tokenize_pair(tok, r) for r in rows], range(3), tok.pad_token_id)
    P, alpha = 3, 0.5
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    anchor = one_step_anchor(model, batch, alpha, normalize=normalize)

    # The model is untouched, and no gradient was left behind.
    for n, p in model.named_parameters():
        assert torch.equal(p, weights_before[n]), n
        assert p.grad is None, n

    # Direct: copy, one plain gradient step on the chosen token-mean NLL, evaluate with full logits.
    stepped = copy.deepcopy(model)
    logps, counts = _naive_chosen_logps(stepped, batch, P)
    (-(logps.sum() / counts.sum())).backward()
    with torch.no_grad():
        for p in stepped.parameters():  # tied embedding/head: one Parameter, its gradient from both uses
            p -= alpha * p.grad
        after, counts = _naive_chosen_logps(stepped, batch, P)
        before, _ = _naive_chosen_logps(model, batch, P)
    if normalize == "mean":
        after, before = after / counts, before / counts
    torch.testing.assert_close(anchor.double(), after, rtol=1e-6, atol=1e-6)
    assert anchor.shape == (P,) and not anchor.requires_grad
    # The step mattered: the anchor is not just the current log-prob, and the SFT step raised it.
    assert (after - before).abs().min() > 1e-3
    assert (after > before).all()


def test_quick_demo_pipeline_runs(tmp_path):
    from training.demo import DemoSettings, run_demo
    settings = DemoSettings.quick()
    settings.progress = False
    result = run_demo(str(tmp_path / "demo"), settings)
    assert [row["model"] for row in result["table"]] == ["SFT", "DPO", "DPO+SPO"]
    assert os.path.getsize(tmp_path / "demo" / "chosen_logps.png") > 0


# ---------------------------------------------------------------------------------------------
# the reproduction driver (python -m training reproduce)
# ---------------------------------------------------------------------------------------------

def test_mean_std_on_known_numbers():
    from training.reproduce import aggregate, mean_std
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5.0 / 3.0)))
    assert mean_std([0.7]) == (0.7, 0.0)
    row = dict(greedy_acc=0.0, d_logp_chosen=0.0, d_logp_rejected=0.0, chosen_fell=0.0, greedy_rejected=0.0,
               greedy_other=0.0, greedy_malformed=0.0)
    results = {seed: {"rows": {name: dict(row, greedy_acc=acc, d_logp_chosen=-acc)
                               for name in ("SFT", "DPO", "DPO+SPO")}}
               for seed, acc in ((0, 0.5), (1, 0.7), (2, 0.9))}
    table = {r["model"]: r for r in aggregate(results, ["DPO"])}
    assert table["DPO"]["n_seeds"] == 3
    assert table["DPO"]["greedy_acc_mean"] == pytest.approx(0.7)
    assert table["DPO"]["greedy_acc_std"] == pytest.approx(0.2)
    assert table["DPO+SPO"]["d_logp_chosen_mean"] == pytest.approx(-0.7)


def test_claims_and_greedy_classes():
    from training.reproduce import claims, classify_greedy
    assert classify_greedy("1+2=3,3+4=7#7", 7, 8) == "right"
    assert classify_greedy("1+2=3,3+4=8#8", 7, 8) == "rejected"
    assert classify_greedy("1+2=3,3+4=9#9", 7, 8) == "other"
    assert classify_greedy("1+2=3,3+4=", 7, 8) == "malformed"
    assert classify_greedy("1+2=3#3#3", 5, 4) == "malformed"
    assert classify_greedy("1+2=3#3#3", 3, 4) == "right"  # accuracy reads the final answer only
    rows = lambda sft, dpo, spo, d: {"SFT": {"greedy_acc": sft, "d_logp_chosen": 0.0},  # noqa: E731
                                     "DPO": {"greedy_acc": dpo, "d_logp_chosen": -3.0},
                                     "DPO+SPO": {"greedy_acc": spo, "d_logp_chosen": d}}
    checked = claims({0: {"rows": rows(0.5, 0.2, 0.5, 0.1)}, 1: {"rows": rows(0.5, 0.2, 0.4, -0.1)}}, ["DPO"])
    assert checked["DPO"]["accuracy_order"] == {0: True, 1: False}
    assert checked["DPO"]["chosen_not_fallen"] == {0: True, 1: False}
    assert not checked["DPO"]["accuracy_order_all"] and not checked["DPO"]["chosen_not_fallen_all"]


def test_reproduce_driver_writes_table_and_json(tmp_path):
    out = tmp_path / "reproduce"
    assert cli_main(["reproduce", "--quick", "--out", str(out), "--seeds", "0", "1", "--methods", "DPO",
                     "SimPO"]) == 0
    text = (out / "reproduce.md").read_text()
    assert "| model | greedy acc | d logp(chosen)" in text
    for name in ("SFT", "DPO", "DPO+SPO", "SimPO", "SimPO+SPO"):
        assert f"| {name} | " in text
    assert " ± " in text and "holds on every seed" in text
    data = json.loads((out / "reproduce.json").read_text())
    assert data["settings"]["seeds"] == [0, 1]
    table = {r["model"]: r for r in data["table"]}
    assert set(table) == {"SFT", "DPO", "DPO+SPO", "SimPO", "SimPO+SPO"}
    for row in table.values():
        assert row["n_seeds"] == 2
        for key in ("greedy_acc", "d_logp_chosen", "d_logp_rejected", "chosen_fell", "greedy_malformed"):
            assert math.isfinite(row[key + "_mean"]) and row[key + "_std"] >= 0
        shares = [row[k + "_mean"] for k in ("greedy_acc", "greedy_rejected", "greedy_other", "greedy_malformed")]
        assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert table["SFT"]["d_logp_chosen_mean"] == 0.0
    per_seed = data["per_seed"]["1"]
    assert per_seed["rows"]["DPO"]["seed"] == 1 and len(per_seed["curves"]["DPO+SPO"]) >= 2
    assert set(data["claims"]) == {"DPO", "SimPO"}
    assert os.path.getsize(out / "reproduce.png") > 0
