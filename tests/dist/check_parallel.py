"""Run with ``torchrun --nproc_per_node 2 tests/dist/check_parallel.py MODE[,MODE...]`` (gloo, CPU); a MODE
is ``ddp``, ``fsdp_root`` (FSDP2, the LM head sharded with the root) or ``fsdp_head`` (the head its own
unit). The modes run one after the other in the same process group, each on models of its own.

Each rank holds half of a global batch of preference pairs; the loss runs inside the model's forward
through spo_kernels.integrations.hf. Checked against one process on the whole batch: the mean loss over
ranks, every parameter gradient after the wrapper's reduction, the parameters after an SGD step, and
(DDP) that the ranks hold identical parameters. Prints one ``RESULT {json}`` line on rank 0; exits 1 on
a mismatch in any mode. The line maps each mode to what it found."""

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dist_common import report_and_exit  # noqa: E402
from spo_kernels import PreferenceLossConfig  # noqa: E402
from spo_kernels.integrations.hf import enable_fused_head  # noqa: E402

TOL = 1e-5
P_GLOBAL, T, V = 4, 11, 83


def build_model():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
                      eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().train()


def global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (2 * P_GLOBAL, T), generator=g)
    am = torch.ones_like(ids)
    am[3, -2:] = 0
    labels = ids.masked_fill(torch.arange(T) < 4, -100).masked_fill(am == 0, -100)
    ref = -torch.rand(2 * P_GLOBAL, generator=g) * 5 - 40  # precomputed reference log-probs
    return ids, am, labels, ref


def local_rows(rank, world):
    per = P_GLOBAL // world
    chosen = list(range(rank * per, (rank + 1) * per))
    return chosen + [P_GLOBAL + i for i in chosen]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check(mode):
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = PreferenceLossConfig(beta=0.1, loss_type="sigmoid", spo_lambda=1.0, spo_margin=0.5)
    ids, am, labels, ref = global_batch()

    single = enable_fused_head(build_model())
    out = single(input_ids=ids, attention_mask=am, labels=labels, spo_loss=cfg, spo_ref_logps=ref)
    single_loss = out.loss.item()
    out.loss.backward()
    single_grads = {n: p.grad.clone() for n, p in single.named_parameters()}
    with torch.no_grad():
        for p in single.parameters():
            p.sub_(0.5 * p.grad)
    single_after = {n: p.detach().clone() for n, p in single.named_parameters()}

    model = enable_fused_head(build_model())
    info = {"mode": mode, "world": world}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        if mode == "fsdp_head":
            fully_shard(model.lm_head, mesh=mesh)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        # The sharded head outside its forward: a clear error from the public API, never a number.
        if mode == "fsdp_head":
            from spo_kernels import fused_linear_sequence_logprobs
            try:
                fused_linear_sequence_logprobs(torch.randn(2, 3, 32), model.lm_head.weight, labels[:2, :3])
                info["dtensor_outside_forward"] = "returned (no error)"
            except (TypeError, ValueError) as exc:
                info["dtensor_outside_forward"] = f"{type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                info["dtensor_outside_forward"] = f"unclear error {type(exc).__name__}"

    rows = local_rows(rank, world)
    if mode == "ddp":  # SPO's one-step anchor: the SFT step on the global batch, whichever rows a rank holds
        from spo_kernels.integrations.anchor import one_step_anchor
        fresh = build_model()
        single_anchor = one_step_anchor(fresh, {"input_ids": ids, "attention_mask": am, "labels": labels}, 0.5,
                                        shift_labels=True, all_reduce=False)
        local_anchor = one_step_anchor(fresh, {"input_ids": ids[rows], "attention_mask": am[rows],
                                               "labels": labels[rows]}, 0.5, shift_labels=True)
        info["anchor_err"] = rel(local_anchor, single_anchor[rows[: len(rows) // 2]])
    out = wrapped(input_ids=ids[rows], attention_mask=am[rows], labels=labels[rows], spo_loss=cfg,
                  spo_ref_logps=ref[rows])
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    info["loss_err"] = abs(loss.item() / world - single_loss) / abs(single_loss)
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    info["grad_err"] = max(rel(grads[n], g) for n, g in single_grads.items())
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
    after = {n: full(p.detach()) for n, p in model.named_parameters()}
    info["param_err_after_step"] = max(rel(after[n], v) for n, v in single_after.items())
    if mode == "fsdp_head":
        # A tensor-parallel head keeps a DTensor weight inside its forward: a clear error, never a number.
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        tp_model = enable_fused_head(build_model())
        parallelize_module(tp_model.lm_head, mesh, ColwiseParallel())
        try:
            tp_model(input_ids=ids[rows], attention_mask=am[rows], labels=labels[rows], spo_logps=True)
            info["tp_head"] = "no error"
        except TypeError as exc:
            info["tp_head"] = "TypeError" if "DTensor" in str(exc) else f"TypeError: {exc}"
    flat = torch.cat([v.reshape(-1) for v in after.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    info["ranks_in_sync"] = all(torch.equal(gathered[0], g) for g in gathered)
    return info


def passed(info):
    return (info.get("tp_head", "TypeError") == "TypeError" and info.get("anchor_err", 0.0) < TOL
            and info["loss_err"] < TOL and info["grad_err"] < TOL and info["param_err_after_step"] < TOL
            and info["ranks_in_sync"])


if __name__ == "__main__":
    dist.init_process_group("gloo")
    infos = {mode: check(mode) for mode in sys.argv[1].split(",")}
    report_and_exit(infos, all(map(passed, infos.values())))
