"""Calls the MoE runner's C ABI (libmoe_runner.so) from Python through ctypes, on PyTorch
tensors' device pointers, and compares the layer's output with the same layer computed in
PyTorch from the checkpoint's safetensors.

    moe gen-checkpoint --arch Qwen3MoeForCausalLM --out /tmp/ckpt
    python3 examples/python/moe_ctypes.py path/to/libmoe_runner.so /tmp/ckpt [TOKENS]
"""
import ctypes
import json
import struct
import sys

import torch

OK = 0


class MoeOptions(ctypes.Structure):
    _fields_ = [
        ("cuda_device_plus_one", ctypes.c_int32),
        ("layer_plus_one", ctypes.c_int32),
        ("max_tokens", ctypes.c_int64),
        ("runner", ctypes.c_char_p),
        ("cuda_stream", ctypes.c_void_p),
    ]


class MoeLayerInfo(ctypes.Structure):
    _fields_ = [
        ("hidden_size", ctypes.c_int64),
        ("num_experts", ctypes.c_int64),
        ("top_k", ctypes.c_int64),
        ("activation_dtype", ctypes.c_int32),
        ("on_gpu", ctypes.c_int32),
    ]


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_safetensors(path):
    """Every tensor of one file, as PyTorch tensors on the CPU."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = bytearray(data[8 + n + a : 8 + n + b])
        t = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]) if raw else torch.empty(0)
        out[name] = t.reshape(info["shape"])
    return out


def route(config, logits):
    """Qwen3-MoE routing: softmax, top-k, renormalized when the config says so."""
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, config["num_experts_per_tok"], dim=-1)
    if config.get("norm_topk_prob", False):
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def reference(weights, config, layer, hidden, logits):
    """The Qwen3-MoE layer in f32: softmax routing, top-k, renormalized, SiLU-gated experts."""
    w, ids = route(config, logits)
    x = hidden.float()
    out = torch.zeros_like(x)
    prefix = f"model.layers.{layer}.mlp.experts"
    for e in range(config["num_experts"]):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        g = weights[f"{prefix}.{e}.gate_proj.weight"].float().cuda()
        u = weights[f"{prefix}.{e}.up_proj.weight"].float().cuda()
        d = weights[f"{prefix}.{e}.down_proj.weight"].float().cuda()
        xe = x[rows]
        y = (torch.nn.functional.silu(xe @ g.T) * (xe @ u.T)) @ d.T
        out.index_add_(0, rows, y * w[rows, slot].unsqueeze(1).cuda())
    return out


def main():
    lib_path, ckpt = sys.argv[1], sys.argv[2]
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 33
    lib = ctypes.CDLL(lib_path)
    lib.moe_layer_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(MoeOptions), ctypes.POINTER(ctypes.c_void_p)]
    lib.moe_layer_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(MoeLayerInfo)]
    lib.moe_layer_path.argtypes = [ctypes.c_void_p]
    lib.moe_layer_path.restype = ctypes.c_char_p
    lib.moe_layer_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.moe_layer_forward_routed.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64]
    lib.moe_layer_destroy.argtypes = [ctypes.c_void_p]
    lib.moe_last_error.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.moe_last_error.restype = ctypes.c_size_t

    def check(status, what):
        if status != OK:
            buf = ctypes.create_string_buffer(1024)
            lib.moe_last_error(buf, 1024)
            raise RuntimeError(f"{what}: status {status}: {buf.value.decode()}")

    # The layer queues its work on PyTorch's current stream, ordered with PyTorch's own; a
    # stream of its own (not the legacy default one), so that it can be captured in a graph.
    stream = torch.cuda.Stream()
    torch.cuda.set_stream(stream)
    opts = MoeOptions(
        cuda_device_plus_one=1, layer_plus_one=0, max_tokens=256, runner=None,
        cuda_stream=stream.cuda_stream,
    )
    layer = ctypes.c_void_p()
    check(lib.moe_layer_create(ckpt.encode(), ctypes.byref(opts), ctypes.byref(layer)), "create")
    info = MoeLayerInfo()
    check(lib.moe_layer_info(layer, ctypes.byref(info)), "info")
    print("path:", lib.moe_layer_path(layer).decode())
    assert info.on_gpu == 1 and info.activation_dtype == 1, (info.on_gpu, info.activation_dtype)

    torch.manual_seed(0)
    hidden = torch.randn(tokens, info.hidden_size, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(tokens, info.num_experts, dtype=torch.float32)
    out = torch.empty_like(hidden)
    check(lib.moe_layer_forward(layer, hidden.data_ptr(), logits.data_ptr(), out.data_ptr(), tokens), "forward")

    config = json.load(open(f"{ckpt}/config.json"))
    weights = read_safetensors(f"{ckpt}/model.safetensors")
    want = reference(weights, config, 0, hidden, logits.cuda())
    rel = ((out.float() - want).norm() / want.norm()).item()
    print(f"{tokens} tokens: rel L2 vs PyTorch {rel:.3e}")

    # The engine's path: routing computed by PyTorch on the GPU, the routed experts through
    # the runner, captured in a CUDA graph on PyTorch's stream and replayed on new inputs.
    w, ids = route(config, logits.cuda())
    topk_ids, topk_w = ids.to(torch.int32).contiguous(), w.float().contiguous()
    routed = torch.empty_like(hidden)

    def routed_call():
        check(lib.moe_layer_forward_routed(layer, hidden.data_ptr(), topk_ids.data_ptr(),
                                           topk_w.data_ptr(), routed.data_ptr(), tokens),
              "forward_routed")

    routed_call()  # warm-up: workspaces are allocated here, not during capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        routed_call()
    hidden.copy_(torch.randn_like(hidden))
    logits2 = torch.randn(tokens, info.num_experts, device="cuda")
    w2, ids2 = route(config, logits2)
    topk_ids.copy_(ids2.to(torch.int32))
    topk_w.copy_(w2.float())
    graph.replay()
    torch.cuda.synchronize()
    want2 = reference(weights, config, 0, hidden, logits2)
    rel_graph = ((routed.float() - want2).norm() / want2.norm()).item()
    print(f"{tokens} tokens, routed entry point replayed from a CUDA graph: rel L2 vs PyTorch {rel_graph:.3e}")

    # A bad call is an error code and a message, not a crash.
    status = lib.moe_layer_forward(layer, None, logits.data_ptr(), out.data_ptr(), tokens)
    buf = ctypes.create_string_buffer(256)
    lib.moe_last_error(buf, 256)
    print(f"null hidden: status {status} ({buf.value.decode()})")
    assert status == 1
    lib.moe_layer_destroy(layer)
    assert rel < 2e-2, rel
    assert rel_graph < 2e-2, rel_graph
    print("ok")


if __name__ == "__main__":
    main()
