"""The Hugging Face fused head (spo_kernels.integrations.hf) against each model's own eager logits, in
float64: per-sequence log-probs and every parameter gradient, for Llama, Qwen2, Mistral, Phi-3, Gemma 2
(softcap), GPT-2 (tied head), Cohere (logit_scale), Granite (logits_scaling), a PEFT LoRA model and a
PEFT ``modules_to_save`` head; the loss mode against the package's loss on the eager logits; unsupported
heads raise. Tiny random models built from configs (nothing downloaded)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spo_kernels import PreferenceLossConfig, preference_loss  # noqa: E402
from spo_kernels.integrations.anchor import one_step_anchor  # noqa: E402
from spo_kernels.integrations.hf import (disable_fused_head, enable_fused_head, head_transform,  # noqa: E402
                                         ld_token_weights, shift_labels)

V = 97


def _config(kind):
    from transformers import (CohereConfig, Gemma2Config, GPT2Config, GraniteConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config)
    common = dict(vocab_size=V, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "phi3": lambda: Phi3Config(**common),
        "gemma2": lambda: Gemma2Config(**common, head_dim=10, final_logit_softcapping=1.5),
        "cohere": lambda: CohereConfig(**common, logit_scale=6.0),
        "granite": lambda: GraniteConfig(**common, logits_scaling=0.2),
        "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=40, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=1, eos_token_id=1),
    }[kind]()


def _model(kind, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager").double()
    with torch.no_grad():  # a peaked softmax and O(1) logits make a wrong transform visible
        m.get_output_embeddings().weight.mul_(8.0)
    return m.train()


def _batch(seed=1, P=3, T=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (2 * P, T), generator=g)
    am = torch.ones_like(ids)
    am[1, -3:] = 0
    am[P + 2, -1:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[am == 0] = -100
    labels[P, 5:] = -100  # an empty completion
    return ids, am, labels


def _eager_logps(model, ids, am, labels):
    logits = model(input_ids=ids, attention_mask=am).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * (labels[:, 1:] != -100)).sum(1)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2", "cohere", "granite"])
def test_logps_and_grads_match_eager_logits(kind):
    model = _model(kind)
    ids, am, labels = _batch()
    upstream = torch.randn(ids.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = _eager_logps(model, ids, am, labels)
    (ref * upstream).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    enable_fused_head(model)
    out = model(input_ids=ids, attention_mask=am, labels=labels, spo_logps=True)
    assert out.logps.dtype == torch.float64 and out.counts.tolist() == (labels[:, 1:] != -100).sum(1).tolist()
    assert _rel(out.logps, ref) < 1e-10, kind
    (out.logps * upstream).sum().backward()
    grads = _grads(model)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert _rel(grads[name], g) < 1e-8, (kind, name)


def test_transforms_read_from_the_config():
    assert head_transform(_config("gemma2")).softcap == 1.5
    assert head_transform(_config("cohere")).multiplier == 6.0
    assert head_transform(_config("granite")).multiplier == pytest.approx(5.0)
    assert head_transform(_config("llama")).multiplier == 1.0 and head_transform(_config("llama")).softcap is None


def test_loss_mode_matches_the_loss_on_eager_logits():
    model = _model("cohere")
    ids, am, labels = _batch()
    cfg = PreferenceLossConfig(beta=0.2, loss_type="sigmoid", spo_lambda=1.0, spo_margin=0.1)
    with torch.no_grad():
        ref_logps = _eager_logps(_model("cohere", seed=5), ids, am, labels)
    logits = model(input_ids=ids, attention_mask=am).logits
    expect = preference_loss(logits[:, :-1], labels[:, 1:], ref_logps=ref_logps, config=cfg, inplace_backward=False)
    expect.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    enable_fused_head(model)
    out = model(input_ids=ids, attention_mask=am, labels=labels, spo_loss=cfg, spo_ref_logps=ref_logps,
                spo_token_stats=True)
    assert abs(out.loss.item() - expect.loss.item()) <= 1e-10 * abs(expect.loss.item())
    for k, v in expect.metrics.items():
        assert torch.allclose(out.metrics[k], v, rtol=1e-9, atol=1e-12, equal_nan=True), k
    assert set(out.token_stat_sums) >= {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    out.loss.backward()
    for name, g in ref_grads.items():
        assert _rel(model.get_parameter(name).grad, g) < 1e-8, name


def test_token_stat_sums_match_eager():
    model = _model("gemma2")
    ids, am, labels = _batch()
    P = ids.shape[0] // 2
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].double()
        mask = labels[:, 1:] != -100
        p = torch.softmax(logits, -1)
        ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
        top = logits.argmax(-1) == ids[:, 1:]
        enable_fused_head(model)
        out = model(input_ids=ids, attention_mask=am, labels=labels, spo_logps=True, spo_token_stats=True)
    s = out.token_stat_sums
    assert torch.allclose(s["entropy"], (ent * mask).sum(), rtol=1e-9)
    assert torch.allclose(s["logits/chosen"], (logits.mean(-1) * mask)[:P].sum(), rtol=1e-9)
    assert torch.allclose(s["logits/rejected"], (logits.mean(-1) * mask)[P:].sum(), rtol=1e-9)
    assert s["mean_token_accuracy"].item() == (top & mask)[:P].sum().item()
    assert s["tokens"].item() == mask.sum().item()


def test_plain_forward_is_untouched_and_patch_is_undone():
    model = _model("llama").eval()
    ids, am, _ = _batch()
    before = model(input_ids=ids, attention_mask=am).logits
    enable_fused_head(model)
    enable_fused_head(model)  # idempotent
    assert torch.equal(model(input_ids=ids, attention_mask=am).logits, before)
    disable_fused_head(model)
    assert "forward" not in model.__dict__
    assert torch.equal(model(input_ids=ids, attention_mask=am).logits, before)


def test_peft_lora_and_modules_to_save_head():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                           init_lora_weights=False)
    pm = peft.get_peft_model(model, lora)
    with torch.no_grad():  # the trained head copy differs from the original
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    ids, am, labels = _batch()
    ref = _eager_logps(pm, ids, am, labels)
    ref.sum().backward()
    ref_grads = _grads(pm)
    pm.zero_grad(set_to_none=True)
    with torch.no_grad(), pm.disable_adapter():
        ref_base = _eager_logps(pm, ids, am, labels)

    enable_fused_head(pm)
    out = pm(input_ids=ids, attention_mask=am, labels=labels, spo_logps=True)
    assert _rel(out.logps, ref) < 1e-10
    out.logps.sum().backward()
    grads = _grads(pm)
    assert set(grads) == set(ref_grads) and any("modules_to_save" in n for n in grads)
    for name, g in ref_grads.items():
        assert _rel(grads[name], g) < 1e-8, name
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids, attention_mask=am, labels=labels, spo_logps=True)
    assert _rel(base.logps, ref_base) < 1e-10 and _rel(ref_base, ref) > 1e-3


def test_unsupported_heads_raise():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="adapter on the LM head"):
        enable_fused_head(pm)

    class Custom(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = _model("llama")
    model.lm_head = Custom(40, V, bias=False).double()
    with pytest.raises(TypeError, match="unsupported LM head"):
        enable_fused_head(model)
    cfg = _config("llama")
    cfg.dim_model_base = 8
    with pytest.raises(NotImplementedError, match="dim_model_base"):
        head_transform(cfg)


def test_bad_calls_raise():
    model = enable_fused_head(_model("llama"))
    ids, am, labels = _batch()
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, attention_mask=am, spo_logps=True)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, attention_mask=am, labels=labels, spo_logps=True, spo_loss=PreferenceLossConfig())
    with pytest.raises(TypeError, match="PreferenceLossConfig"):
        model(input_ids=ids, attention_mask=am, labels=labels, spo_loss={"beta": 0.1})
    with pytest.raises(ValueError, match="softcap"):
        model(input_ids=ids, attention_mask=am, labels=labels, spo_loss=PreferenceLossConfig(softcap=3.0),
              spo_ref_logps=torch.zeros(ids.shape[0], dtype=torch.float64))


def test_label_helpers():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])
    assert shift_labels(labels).tolist() == [[-100, 5, 6, 7, -100], [3, 4, -100, -100, -100]]
    pair = torch.tensor([[1, 1, 1, -100], [2, -100, -100, -100]])  # chosen 3 tokens, rejected 1
    w = ld_token_weights(pair, 0.25)
    assert w.tolist() == [[1.0, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_one_step_anchor_with_multiplier_and_hf_labels(normalize):
    """The anchor equals the chosen log-probs (from the model's own eager logits) after a real SGD step."""
    model = _model("granite")
    ids, am, labels = _batch()
    P, alpha = ids.shape[0] // 2, 0.3
    anchor = one_step_anchor(model, {"input_ids": ids, "attention_mask": am, "labels": labels}, alpha,
                             normalize=normalize, shift_labels=True)
    chosen = _eager_logps(model, ids[:P], am[:P], labels[:P])
    n = (labels[:P, 1:] != -100).sum(1)
    (-chosen.sum() / n.sum()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(alpha * p.grad)
        after = _eager_logps(model, ids[:P], am[:P], labels[:P])
    expect = after / n.clamp(min=1) if normalize == "mean" else after
    assert _rel(anchor.double(), expect) < 1e-6
