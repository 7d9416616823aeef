"""The speed options change the speed, not the results: each fast path against the plain one."""
import json

import pytest
import torch

import models_mae
from perf.throughput import find_max_batch, set_fused_attention
from run.setup import adamw, convert_to_fp8, fp8_layer_filter
from util.lr_decay import param_groups_weight_decay
from util.misc import autocast, mark_step_begin

METHODS = ["patches", "segments", "four_channels", "preencoder"]


def tiny(method="patches", seed=0, **kw):
    torch.manual_seed(seed)
    return models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method=method, **kw)


def batch(method, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, 32, 32, generator=g)
    seg = (torch.rand(n, 1, 32, 32, generator=g) > 0.5).float() if method != "patches" else None
    noise = torch.rand(n, 16, generator=g)
    return imgs, seg, noise


def block_import(monkeypatch, package: str) -> None:
    """Makes ``import package`` fail, as where it is not installed."""
    import builtins
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)


def loss_and_grads(model, method, amp="none"):
    imgs, seg, noise = batch(method)
    with autocast(torch.device("cpu"), amp):
        loss, _, _ = model(imgs, noise=noise, seg_mask=seg)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["fused", "foreach", "forloop"])
def test_adamw_implementations_train_to_the_same_weights(impl):
    def train(impl):
        model = tiny()
        opt = adamw(param_groups_weight_decay(model, 0.05), lr=1e-3, device=torch.device("cpu"), impl=impl)
        for step in range(3):
            imgs, _, noise = batch("patches", seed=step)
            model(imgs, noise=noise)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model.state_dict()

    plain, fast, init = train("auto"), train(impl), tiny().state_dict()
    assert plain.keys() == fast.keys()
    moved = 0
    for k in plain:
        a, b = fast[k], plain[k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has no true gradient (softmax ignores a constant per query), so Adam
            # normalises rounding noise there: compare the query and value thirds only
            third = a.numel() // 3
            a, b = torch.cat([a[:third], a[2 * third:]]), torch.cat([b[:third], b[2 * third:]])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(plain[k], init[k])
    assert moved > 50  # the optimizer did change the weights


@pytest.mark.parametrize("method", METHODS)
def test_fused_and_explicit_attention_agree(method):
    fused, naive = tiny(method), tiny(method)
    assert set_fused_attention(fused, True) == 12 + 4  # every encoder and decoder block
    assert set_fused_attention(naive, False) == 16
    loss_f, grads_f = loss_and_grads(fused, method)
    loss_n, grads_n = loss_and_grads(naive, method)
    torch.testing.assert_close(loss_f, loss_n, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_n.keys()
    for k in grads_f:
        torch.testing.assert_close(grads_f[k], grads_n[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_loss_within_bf16_tolerance(method):
    loss32, grads32 = loss_and_grads(tiny(method), method)
    loss16, grads16 = loss_and_grads(tiny(method), method, amp="bf16")
    assert loss16.dtype == torch.float32  # the loss itself is computed in fp32
    assert abs(loss16 - loss32) / loss32 < 2e-2
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    g16 = torch.cat([grads16[k].flatten() for k in grads32])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99


def test_fp8_converts_the_transformer_linears_and_keeps_the_results_and_the_checkpoint_format():
    pytest.importorskip("torchao")  # in requirements.txt: CI always runs this
    plain, fp8 = tiny("four_channels"), tiny("four_channels")
    n = convert_to_fp8(fp8, torch.device("cpu"))
    converted = {name for name, m in fp8.named_modules() if type(m).__name__ == "Float8Linear"}
    # qkv, proj, fc1, fc2 of 12 encoder + 4 decoder blocks, and decoder_embed; not decoder_pred
    assert n == len(converted) == 16 * 4 + 1
    assert "decoder_embed" in converted and "decoder_pred" not in converted
    # same parameter names and shapes: checkpoints load either way
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    fp8.load_state_dict(plain.state_dict())
    loss32, grads32 = loss_and_grads(plain, "four_channels")
    loss8, grads8 = loss_and_grads(fp8, "four_channels")
    assert abs(loss8 - loss32) / loss32 < 5e-2
    assert grads8.keys() == grads32.keys()  # every trainable parameter still gets a gradient
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    g8 = torch.cat([grads8[k].flatten() for k in grads32])
    assert torch.nn.functional.cosine_similarity(g32, g8, dim=0) > 0.95


def test_fp8_layer_filter_skips_heads_and_odd_sizes():
    assert fp8_layer_filter(torch.nn.Linear(64, 128), "blocks.0.mlp.fc1")
    assert not fp8_layer_filter(torch.nn.Linear(64, 192), "decoder_pred")
    assert not fp8_layer_filter(torch.nn.Linear(64, 10), "head")
    assert not fp8_layer_filter(torch.nn.Linear(64, 100), "blocks.0.mlp.fc2")
    assert not fp8_layer_filter(torch.nn.LayerNorm(64), "norm")


def test_fp8_errors_name_the_fix(monkeypatch):
    from util.misc import UserError
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UserError, match="compute capability 8.9.*8.0.*without --fp8"):
        convert_to_fp8(tiny(), torch.device("cuda"))
    block_import(monkeypatch, "torchao")
    with pytest.raises(UserError, match="pip install torchao"):
        convert_to_fp8(tiny(), torch.device("cpu"))


@pytest.mark.parametrize("capacity", [0, 1, 7, 8, 9, 300, 1000, 5000])
def test_find_max_batch_finds_the_boundary_in_few_tries(capacity):
    tries = []

    def fits(b):
        tries.append(b)
        return b <= capacity

    assert find_max_batch(fits, start=8, limit=1000) == min(capacity, 1000)
    assert len(tries) <= 2 * 11 + 2  # doubling then bisection: logarithmic


def test_a_compile_mode_implies_compile():
    from argparse import Namespace

    from run.setup import resolve_compile_flags
    args = Namespace(compile=False, compile_mode="reduce-overhead")
    resolve_compile_flags(args)
    assert args.compile
    args = Namespace(compile=False, compile_mode="default")
    resolve_compile_flags(args)
    assert not args.compile


def test_mark_step_begin_only_under_cuda_graph_modes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    for mode in (None, "default", "max-autotune-no-cudagraphs"):
        mark_step_begin(mode)
    assert calls == []
    mark_step_begin("reduce-overhead")
    mark_step_begin("max-autotune")
    assert calls == [1, 1]


def test_training_loop_does_not_wait_for_the_device_every_step(toy_root, tmp_path, monkeypatch):
    """Host-device syncs (.item(), .tolist()) in the training step happen when a progress line is
    printed and at the end of the epoch, not per step. (The data workers' .item() calls on CPU
    random numbers are not syncs and are not counted.)"""
    import sys

    import main_pretrain
    counts = {"item": 0, "tolist": 0}
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
    step_code = ("engine_pretrain.py", "main_pretrain.py", "models_mae.py", "masking.py", "misc.py")

    def in_step() -> bool:
        return sys._getframe(2).f_code.co_filename.endswith(step_code)

    def item(self):
        counts["item"] += in_step()
        return real_item(self)

    def tolist(self):
        counts["tolist"] += in_step()
        return real_tolist(self)

    def run(batch_size):
        counts.update(item=0, tolist=0)
        monkeypatch.setattr(torch.Tensor, "item", item)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                           "--batch_size", str(batch_size), "--epochs", "1", "--warmup_epochs", "0",
                           "--num_workers", "0", "--output_dir", "", "--log_dir", str(tmp_path / f"log{batch_size}"),
                           "--device", "cpu", "--mask_method", "segments", "--print_freq", "1000"])
        monkeypatch.undo()
        return dict(counts)

    eight_steps, sixteen_steps = run(4), run(2)
    # the same few reads (progress lines, epoch end) however many steps the epoch has
    assert eight_steps == sixteen_steps and sum(eight_steps.values()) < 30, (eight_steps, sixteen_steps)


def test_throughput_ablation_and_max_batch_on_cpu(tmp_path):
    from perf import throughput
    common = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--batch_size", "4", "--device", "cpu",
              "--warmup", "1", "--iters", "2"]
    rows = throughput.main(common + ["--ablation", "reference,sdpa,fused_adamw", "--json", str(tmp_path / "a.json")])
    assert [r["row"] for r in rows] == ["reference", "sdpa", "fused_adamw"]
    assert rows[0]["gain_vs_previous"] is None and all(r["gain_vs_previous"] > 0 for r in rows[1:])
    assert json.load(open(tmp_path / "a.json"))["results"][2]["row"] == "fused_adamw"
    rows = throughput.main(common + ["--max_batch", "--max_batch_limit", "16"])
    assert [(r["grad_checkpointing"], r["max_batch"]) for r in rows] == [(False, 16), (True, 16)]
    with pytest.raises(SystemExit):
        throughput.main(common + ["--ablation", "warp_drive"])


def test_throughput_peer_without_transformers_says_how_to_install(monkeypatch, capsys):
    from perf import throughput
    block_import(monkeypatch, "transformers")
    rows = throughput.main(["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--batch_size", "2",
                            "--device", "cpu", "--warmup", "0", "--iters", "1", "--peer"])
    assert [r["name"] for r in rows] == ["ours"]
    assert "pip install transformers" in capsys.readouterr().out


def test_max_batch_counts_allocation_failures_as_not_fitting(monkeypatch, capsys):
    from perf import throughput
    real_build = throughput.build_step

    def build(cfg, device):
        if cfg.batch_size > 5:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
        return real_build(cfg, device)

    monkeypatch.setattr(throughput, "build_step", build)
    rows = throughput.main(["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--batch_size", "2",
                            "--device", "cpu", "--max_batch", "--max_batch_limit", "64"])
    assert [r["max_batch"] for r in rows] == [5, 5]
    assert "batch 8 does not train: RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED" in capsys.readouterr().out
