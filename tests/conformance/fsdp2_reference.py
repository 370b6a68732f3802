#!/usr/bin/env python3
"""PyTorch FSDP2 (fully_shard) side of the conformance suite.

For each case (scenario, world size, mode) this launches one process per rank
(forked from this one, so torch is imported once), runs Gloo on 127.0.0.1 on
CPU, builds the Python twin of our C++ scenario model (scenarios/models.cpp)
with the same FQNs and units, loads the initial params and per-rank inputs
that our C++ driver wrote (tests/conformance/conformance_driver.cpp: one
source of truth for the numbers), applies fully_shard children first and the
root last, trains `steps` steps with SGD(lr 1e-2, momentum 0.9) and records,
per rank and step:

  - the loss; every param (full, via full_tensor()) and grad after the step;
  - every collective FSDP2 issues (dist.all_gather_single,
    dist.reduce_scatter_single, dist.all_reduce in torch 2.15; every other
    c10d entry point is wrapped too, so an unexpected call shows up);
  - engine events: unshard / reshard / pre_backward / post_backward /
    prefetch / final_callback, from FSDPParamGroup and FSDPState.

Outputs, in the case directory: fsdp2_rank{r}.json (losses, collectives,
events) and fsdp2_rank{r}.pt (a flat dict "step/<s>/param/<fqn>",
"step/<s>/grad/<fqn>" of full tensors). A case that fails writes
fsdp2_error.txt and makes the exit status non-zero.

Usage:
  fsdp2_reference.py --root DIR --case NAME [--case NAME ...]
  fsdp2_reference.py --root DIR --cases-file FILE   (one case name a line)
Case names: "<scenario>.<mode>.w<W>", modes raf_on, raf_off, hsdp<R>x<S>,
prefetch, accum, mp_*, ckpt, clip, mp_accum, ext_bf16 (see cases.py). Normally run
through generate.py, after the driver.
"""

import argparse
import datetime
import json
import os
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as case_lib  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ---------------------------------------------------------------------------
# Twins of scenarios/models.cpp. Same module tree, FQNs and forward.


class MLP(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        self.in_proj = nn.Linear(dim, mult * dim)
        self.out_proj = nn.Linear(mult * dim, dim)

    def forward(self, x):
        return F.relu(self.out_proj(F.relu(self.in_proj(x))))


class NestedRoot(nn.Module):
    """NestedRoot: the chain lives in `module` (a Chain = plain Sequential)."""

    def __init__(self, chain):
        super().__init__()
        self.module = chain

    def forward(self, x):
        return self.module(x)


class EncoderStack(nn.Module):
    def __init__(self, num_layers, d_model, nhead, ff):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=ff, dropout=0.0) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, src):
        for layer in self.layers:
            src = layer(src)
        return self.norm(src)


class DecoderStack(nn.Module):
    def __init__(self, num_layers, d_model, nhead, ff):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward=ff, dropout=0.0) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory):
        for layer in self.layers:
            tgt = layer(tgt, memory)
        return self.norm(tgt)


class TransformerCore(nn.Module):
    def __init__(self, d_model, nhead, ff, num_layers):
        super().__init__()
        self.encoder = EncoderStack(num_layers, d_model, nhead, ff)
        self.decoder = DecoderStack(num_layers, d_model, nhead, ff)


class TransformerWithSharedParams(nn.Module):
    VOCAB, D_MODEL, BATCH = 23, 16, 2

    def __init__(self, batch_norm=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(self.VOCAB, self.D_MODEL)
        self.transformer = TransformerCore(self.D_MODEL, 2, 8, 2)
        self.output_proj = nn.Linear(self.D_MODEL, self.VOCAB)
        self.output_proj.weight = self.embed_tokens.weight  # the tie
        self.register_buffer("vocab_bias", torch.ones(self.D_MODEL))
        self.register_buffer("long_buffer", torch.zeros(self.D_MODEL, dtype=torch.long))
        self.bn = nn.BatchNorm1d(self.BATCH) if batch_norm else None

    def forward(self, src_ids, tgt_ids):
        src = self.embed_tokens(src_ids)
        src = src + self.vocab_bias + self.long_buffer.to(src.dtype)
        tgt = self.embed_tokens(tgt_ids)
        if self.bn is not None:
            tgt = self.bn(tgt)
        memory = self.transformer.encoder(src)
        x = self.transformer.decoder(tgt, memory)
        return self.output_proj(x)


def param_block_terms(params, inputs, first):
    total = None
    for i, p in enumerate(params):
        term = (torch.tanh(p) * inputs[first + i]).sum()
        total = term if total is None else total + term
    return total


class ParamBlock(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self._names = [name for name, _ in shapes]
        for name, shape in shapes:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def forward(self, inputs):
        return param_block_terms([getattr(self, n) for n in self._names], inputs, 0)


class UnevenShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.block0 = ParamBlock([("w0", (17, 257)), ("b0", (17,)), ("w1", (64, 312)), ("b1", (64,))])
        self.block1 = ParamBlock([("w2", (64, 64)), ("w3", (512, 64)), ("w4", (64, 297))])
        self.b2 = nn.Parameter(torch.empty(256))

    def forward(self, inputs):
        first = self.block0(list(inputs[0:4]))
        second = self.block1(list(inputs[4:7]))
        return first + second + param_block_terms([self.b2], inputs, 7)


class DoubleLinear(nn.Module):
    """A root without params of its own: lin1 and lin2 are units."""

    def __init__(self, dim):
        super().__init__()
        self.lin1 = nn.Linear(dim, dim)
        self.lin2 = nn.Linear(dim, dim)

    def forward(self, x):
        return [F.relu(self.lin1(x)), F.relu(self.lin2(x))]


class Twin:
    """A scenario: the module, its units (children first, root last, as
    module FQNs; "" is the root), rank-local units and the loss."""

    def __init__(self, module, units, loss_fn, rank_local=()):
        self.module = module
        self.units = units
        self.loss_fn = loss_fn
        self.rank_local = set(rank_local)


def make_twin(name):
    if name == "mlp_stack":
        model = nn.Sequential(MLP(16, 3), MLP(16, 4), MLP(16, 3), nn.LayerNorm(16))
        # Regression onto the teacher targets the C++ scenario draws (x[1]).
        return Twin(model, ["0", "1", "2", ""], lambda m, x: F.mse_loss(m(x[0]), x[1]))
    if name == "nested_wrapped":
        chain = nn.Sequential(nn.Linear(8, 4), nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16)),
                              nn.Linear(16, 4), nn.Linear(4, 8))
        return Twin(NestedRoot(chain), ["module.1.0", "module.1", "module.2", ""], lambda m, x: m(x[0]).sum())
    if name == "mixture_of_experts":
        chain = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 23), nn.Linear(23, 12), nn.Linear(12, 8))
        return Twin(NestedRoot(chain), ["module.1", "module.2", ""], lambda m, x: m(x[0]).sum(),
                    rank_local=["module.2"])
    if name == "transformer":
        model = TransformerWithSharedParams(batch_norm=True)

        def loss(m, x):
            out = m(x[0], x[1])
            return F.cross_entropy(out.view(-1, out.size(-1)), x[1].view(-1), reduction="sum")

        units = ["transformer.encoder.layers.0", "transformer.encoder.layers.1",
                 "transformer.decoder.layers.0", "transformer.decoder.layers.1", ""]
        return Twin(model, units, loss)
    if name == "non_uniform_req_grad":
        chain = nn.Sequential(nn.Linear(8, 4), nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16)),
                              nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 8)))
        model = NestedRoot(chain)
        for fqn, p in model.named_parameters():
            p.requires_grad_(fqn.startswith("module.2.1."))  # only the last Linear trains
        return Twin(model, ["module.1.0", "module.1", "module.2", ""], lambda m, x: m(x[0]).sum())
    if name == "double_linear":
        model = DoubleLinear(16)

        def loss(m, x):
            total = None
            for out in m(x[0]):
                total = out.sum() if total is None else total + out.sum()
            return total

        return Twin(model, ["lin1", "lin2", ""], loss)
    if name == "uneven_shapes":
        return Twin(UnevenShapes(), ["block0", "block1", ""], lambda m, x: m(list(x)))
    raise ValueError(f"no Python twin for scenario {name!r}")


# ---------------------------------------------------------------------------
# Recorders. One process is one rank, so module-level state is per rank.

# collectives and events share one sequence counter ("seq"), so the two can be
# ordered against each other.
_REC = {"on": False, "collectives": [], "events": [], "current_unit": None, "seq": 0}


def _next_seq():
    _REC["seq"] += 1
    return _REC["seq"] - 1

_DTYPE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
          torch.float16: "float16", torch.int64: "int64", torch.uint8: "uint8", torch.int32: "int32"}


def _reduce_op_name(op):
    if op is None:
        return None
    s = str(op).split(".")[-1].lower()
    return {"sum": "sum", "avg": "avg", "min": "min", "max": "max"}.get(s, s)


def _group_ranks(group):
    if group is None:
        group = dist.group.WORLD
    return dist.get_process_group_ranks(group)


def _install_collective_recorders():
    """Wraps c10d's Python entry points. FSDP2 calls them as attributes of
    torch.distributed (dist.all_gather_single(...)), so replacing the module
    attributes catches every call."""

    def wrap(name, op, describe):
        original = getattr(dist, name)

        def wrapper(*args, **kwargs):
            if _REC["on"]:
                entry = {"seq": _next_seq(), "op": op, "api": name}
                entry.update(describe(*args, **kwargs))
                _REC["collectives"].append(entry)
            return original(*args, **kwargs)

        setattr(dist, name, wrapper)

    def gather_like(output_tensor=None, input_tensor=None, group=None, async_op=False, **_):
        return {"group": _group_ranks(group), "dtype": _DTYPE.get(input_tensor.dtype, str(input_tensor.dtype)),
                "in_numel": input_tensor.numel(), "out_numel": output_tensor.numel(), "reduce_op": None}

    def args_gather(*args, **kwargs):
        names = ["output_tensor", "input_tensor", "group", "async_op"]
        kw = dict(zip(names, args))
        kw.update(kwargs)
        return gather_like(**kw)

    def args_scatter(*args, **kwargs):
        names = ["output", "input", "op", "group", "async_op"]
        kw = dict(zip(names, args))
        kw.update(kwargs)
        out, inp = kw["output"], kw["input"]
        return {"group": _group_ranks(kw.get("group")), "dtype": _DTYPE.get(inp.dtype, str(inp.dtype)),
                "in_numel": inp.numel(), "out_numel": out.numel(),
                "reduce_op": _reduce_op_name(kw.get("op", dist.ReduceOp.SUM))}

    def args_all_reduce(*args, **kwargs):
        names = ["tensor", "op", "group", "async_op"]
        kw = dict(zip(names, args))
        kw.update(kwargs)
        t = kw["tensor"]
        return {"group": _group_ranks(kw.get("group")), "dtype": _DTYPE.get(t.dtype, str(t.dtype)),
                "in_numel": t.numel(), "out_numel": t.numel(),
                "reduce_op": _reduce_op_name(kw.get("op", dist.ReduceOp.SUM))}

    def args_other(*args, **kwargs):
        return {"group": None, "dtype": None, "in_numel": None, "out_numel": None, "reduce_op": None}

    wrap("all_gather_single", "all_gather", args_gather)
    wrap("all_gather_into_tensor", "all_gather", args_gather)
    wrap("reduce_scatter_single", "reduce_scatter", args_scatter)
    wrap("reduce_scatter_tensor", "reduce_scatter", args_scatter)
    wrap("all_reduce", "all_reduce", args_all_reduce)
    for other in ["all_gather", "reduce_scatter", "broadcast", "barrier", "all_to_all", "all_to_all_single",
                  "reduce", "gather", "scatter", "all_reduce_coalesced", "send", "recv"]:
        if hasattr(dist, other):
            wrap(other, other, args_other)


def _funcol_group_ranks(group):
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        return dist.get_process_group_ranks(group[0].get_group(group[1]))
    if isinstance(group, DeviceMesh):
        return dist.get_process_group_ranks(group.get_group())
    if isinstance(group, dist.ProcessGroup):
        return dist.get_process_group_ranks(group)
    return str(group)


def _install_functional_collective_recorders():
    """Wraps the functional collectives (torch.distributed._functional_collectives),
    which DTensor's redistribution calls (clip_grad_norm_ on DTensor grads)
    instead of dist.*: they bypass the wrappers above. Only the training-loop
    family installs them (the base matrix records what it always has)."""
    import torch.distributed._functional_collectives as funcol

    def wrap(name, op, describe):
        original = getattr(funcol, name)

        def wrapper(*args, **kwargs):
            if _REC["on"]:
                entry = {"seq": _next_seq(), "op": op, "api": "funcol." + name}
                entry.update(describe(*args, **kwargs))
                _REC["collectives"].append(entry)
            return original(*args, **kwargs)

        setattr(funcol, name, wrapper)

    def describe(kind):
        def inner(tensor, *args, **kwargs):
            names = ["reduceOp", "group", "tag"] if kind == "all_reduce" else (
                ["reduceOp", "scatter_dim", "group", "tag"] if kind == "reduce_scatter" else ["gather_dim", "group", "tag"])
            kw = dict(zip(names, args))
            kw.update(kwargs)
            group = _funcol_group_ranks(kw.get("group"))
            size = len(group) if isinstance(group, list) else 1
            n = tensor.numel()
            out = {"all_reduce": n, "reduce_scatter": n // max(size, 1), "all_gather": n * size}[kind]
            return {"group": group, "dtype": _DTYPE.get(tensor.dtype, str(tensor.dtype)), "in_numel": n,
                    "out_numel": out, "reduce_op": _reduce_op_name(kw.get("reduceOp"))}
        return inner

    wrap("all_reduce", "all_reduce", describe("all_reduce"))
    wrap("reduce_scatter_tensor", "reduce_scatter", describe("reduce_scatter"))
    wrap("all_gather_tensor", "all_gather", describe("all_gather"))
    for other in ["all_gather_single", "reduce_scatter_single", "all_reduce_coalesced", "all_to_all_single"]:
        original = getattr(funcol, other)

        def wrapper(*args, _original=original, _name=other, **kwargs):
            if _REC["on"]:
                _REC["collectives"].append({"seq": _next_seq(), "op": _name, "api": "funcol." + _name, "group": None,
                                            "dtype": None, "in_numel": None, "out_numel": None, "reduce_op": None})
            return _original(*args, **kwargs)

        setattr(funcol, other, wrapper)


def _event(kind, unit, **extra):
    if _REC["on"]:
        entry = {"seq": _next_seq(), "kind": kind, "unit": unit}
        entry.update(extra)
        _REC["events"].append(entry)


def _install_event_recorders():
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg_mod
    from torch.distributed.fsdp._fully_shard import _fsdp_state as state_mod

    Group = pg_mod.FSDPParamGroup
    State = state_mod.FSDPState

    def ag_world(group):
        from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo
        if isinstance(group.mesh_info, FSDPMeshInfo):
            return group._all_gather_process_group.size()
        return 1

    orig_unshard = Group.unshard

    def unshard(self, async_op=False):
        pending_before = self._all_gather_result is not None or self.is_unsharded
        result = orig_unshard(self, async_op)
        if not pending_before and self._all_gather_result is not None:
            _event("unshard", self._module_fqn, ag_world=ag_world(self), state=self._training_state.name)
        return result

    orig_reshard = Group.reshard

    def reshard(self):
        was_unsharded = self.is_unsharded
        result = orig_reshard(self)
        if was_unsharded and not self.is_unsharded:
            _event("reshard", self._module_fqn, ag_world=ag_world(self), state=self._training_state.name)
        return result

    orig_pre_backward = Group.pre_backward

    def pre_backward(self, default_prefetch, *unused):
        if self._training_state != pg_mod.TrainingState.PRE_BACKWARD:
            _event("pre_backward", self._module_fqn)
        previous = _REC["current_unit"]
        _REC["current_unit"] = self._module_fqn
        try:
            return orig_pre_backward(self, default_prefetch, *unused)
        finally:
            _REC["current_unit"] = previous

    orig_post_backward = Group.post_backward
    reduced = {"flag": False}
    orig_foreach_reduce = pg_mod.foreach_reduce

    def foreach_reduce(*args, **kwargs):
        reduced["flag"] = True
        return orig_foreach_reduce(*args, **kwargs)

    pg_mod.foreach_reduce = foreach_reduce

    def post_backward(self, *unused):
        was_unsharded = self.is_unsharded
        reduced["flag"] = False
        result = orig_post_backward(self, *unused)
        _event("post_backward", self._module_fqn, was_unsharded=was_unsharded, reduced=reduced["flag"])
        return result

    orig_prefetch = Group._prefetch_unshard

    def prefetch_unshard(target, pass_type):
        _event("prefetch", _REC["current_unit"], target=target._module_fqn, pass_type=pass_type)
        return orig_prefetch(target, pass_type)

    orig_state_pre_forward = State._pre_forward

    def state_pre_forward(self, module, args, kwargs):
        previous = _REC["current_unit"]
        group = self._fsdp_param_group
        _REC["current_unit"] = group._module_fqn if group is not None else "<no param group>"
        try:
            return orig_state_pre_forward(self, module, args, kwargs)
        finally:
            _REC["current_unit"] = previous

    orig_state_pre_backward = State._pre_backward

    def state_pre_backward(self, grad):
        previous = _REC["current_unit"]
        group = self._fsdp_param_group
        _REC["current_unit"] = group._module_fqn if group is not None else "<no param group>"
        try:
            return orig_state_pre_backward(self, grad)
        finally:
            _REC["current_unit"] = previous

    orig_final = State._root_post_backward_final_callback

    def final_callback(self):
        result = orig_final(self)
        group = self._fsdp_param_group
        _event("final_callback", group._module_fqn if group is not None else "")
        return result

    Group.unshard = unshard
    Group.reshard = reshard
    Group.pre_backward = pre_backward
    Group.post_backward = post_backward
    Group._prefetch_unshard = staticmethod(prefetch_unshard)
    State._pre_forward = state_pre_forward
    State._pre_backward = state_pre_backward
    State._root_post_backward_final_callback = final_callback


# ---------------------------------------------------------------------------
# One rank of one case.


def _checkpoint_forward(module):
    """Runs `module`'s own forward under non-reentrant activation
    checkpointing; FSDP2's hooks (fully_shard) stay outside it, as our
    fsdp::checkpoint sits inside the unit's forward."""
    from torch.utils.checkpoint import checkpoint
    inner = module.forward
    module.forward = lambda *args: checkpoint(inner, *args, use_reentrant=False)


# ---------------------------------------------------------------------------
# All-gather extension (mode ext_bf16): an fp32 param whose FSDP2 all-gather
# sends a bf16 copy of its padded shard and upcasts what was gathered. A
# wrapper subclass: every op runs on the wrapped fp32 tensor and rewraps
# float results, so FSDP2's chunking, the optimiser and full_tensor() keep it.


class Bf16GatherTensor(torch.Tensor):
    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, data.stride(), data.storage_offset(),
                                                   dtype=data.dtype, device=data.device)

    def __init__(self, data):
        self._data = data

    def __repr__(self):
        return f"Bf16GatherTensor({self._data!r})"

    def __tensor_flatten__(self):
        return ["_data"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Bf16GatherTensor(inner["_data"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        import torch.utils._pytree as pytree

        def unwrap(t):
            return t._data if isinstance(t, Bf16GatherTensor) else t

        out = func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs or {}))
        return pytree.tree_map_only(torch.Tensor, lambda t: Bf16GatherTensor(t) if t.is_floating_point() else t, out)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        # An uneven shard must gather exactly ceil(dim0 / S) rows (FSDP2
        # checks): zero rows past the end, as our AllGatherContext::padded_shard.
        rows = -(-outer_size[0] // mesh.size())
        data = self._data
        if data.size(0) < rows:
            data = F.pad(data, (0, 0) * (data.dim() - 1) + (0, rows - data.size(0)))
        return (data.to(torch.bfloat16),), None

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        (gathered,) = outputs
        if out is not None:  # later gathers: in place (out views the first result's storage)
            from torch.autograd.grad_mode import _unsafe_preserve_version_counter
            with torch.no_grad(), _unsafe_preserve_version_counter(out):
                out.copy_(gathered[:out.size(0)])
            return None
        full = gathered.to(param_dtype)
        return full, (full,)


def _plain(tensor):
    return tensor._data if isinstance(tensor, Bf16GatherTensor) else tensor


def _wrap_linear_weights(modules, units):
    """ext_bf16: every nn.Linear weight of every non-root unit gathers bf16."""
    for unit in units:
        if unit == "":
            continue
        for sub in modules[unit].modules():
            if isinstance(sub, nn.Linear):
                sub.weight = nn.Parameter(Bf16GatherTensor(sub.weight.detach().clone()))


def load_cpp_pickle(path):
    """torch.load of a file from torch::pickle_save. LibTorch tags a typed
    Dict with torch.jit._pickle.restore_type_tag, which weights_only loading
    refuses unless allowed; nothing else is allowed."""
    import torch.jit._pickle
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        return torch.load(path, weights_only=True)


def _load_init(case_dir, rank):
    path = os.path.join(case_dir, f"init_rank{rank}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the C++ driver (conformance_driver) writes it first")
    flat = load_cpp_pickle(path)
    params = {k[len("param/"):]: v for k, v in flat.items() if k.startswith("param/")}
    inputs = {}
    for k, v in flat.items():
        if k.startswith("input/"):
            _, step, index = k.split("/")
            inputs.setdefault(int(step), {})[int(index)] = v
    inputs = {s: [d[i] for i in sorted(d)] for s, d in inputs.items()}
    return params, inputs


def _run_rank(rank, case, case_dir, port, result_queue):
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=case.world,
                                timeout=datetime.timedelta(seconds=120))
        _install_collective_recorders()
        if case.family == "train":
            _install_functional_collective_recorders()
        _install_event_recorders()
        _train(rank, case, case_dir)
        dist.barrier()
        dist.destroy_process_group()
        result_queue.put((rank, None))
        result_queue.close()
        result_queue.join_thread()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result_queue.put((rank, traceback.format_exc()))
        result_queue.close()
        result_queue.join_thread()  # flush before the hard exit
        os._exit(1)


def _train(rank, case, case_dir):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    W = case.world
    twin = make_twin(case.scenario)
    model = twin.module
    init_params, inputs = _load_init(case_dir, rank)
    if case.mode == "clip":  # a param no rank uses (the driver's add_unused_param)
        dict(model.named_modules())[case_lib.UNUSED_PARAM[case.scenario]].register_parameter(
            "spare", nn.Parameter(torch.empty(6)))
    named = dict(model.named_parameters())  # tied params once, first FQN
    missing = sorted(set(named) - set(init_params))
    extra = sorted(set(init_params) - set(named))
    if missing or extra:
        raise RuntimeError(f"FQNs differ from the C++ model: missing in init file {missing}, "
                           f"unknown to the Python twin {extra}")
    with torch.no_grad():
        for fqn, p in named.items():
            src = init_params[fqn]
            if tuple(src.shape) != tuple(p.shape):
                raise RuntimeError(f"{fqn}: C++ shape {tuple(src.shape)}, Python shape {tuple(p.shape)}")
            p.copy_(src)

    # Meshes, built identically on every rank (new_group is collective).
    if case.mode in case_lib.HSDP_MODES:
        R = case.replicate
        mesh = init_device_mesh("cpu", (R, W // R), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (W,))
    self_groups = [dist.new_group([r]) for r in range(W)]
    self_mesh = DeviceMesh.from_group(self_groups[rank], "cpu")

    modules = dict(model.named_modules())
    if case.mode == "ckpt":
        for fqn in case_lib.CKPT_MODULES[case.scenario]:
            _checkpoint_forward(modules[fqn])
    if case.mode in case_lib.EXT_MODES:
        _wrap_linear_weights(modules, twin.units)
    raf_children = case.mode != "raf_off"
    mp = {}
    if case.mode in case_lib.MP_DTYPES:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        param_dtype, reduce_dtype = (getattr(torch, name) for name in case_lib.MP_DTYPES[case.mode])
        mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    for unit in twin.units:
        module = modules[unit]
        unit_mesh = self_mesh if unit in twin.rank_local else mesh
        if unit == "":
            # The root: reshard_after_forward left to FSDP2's default (None: the
            # root keeps its params after forward, as our engine's root does)
            # unless resharding is off everywhere.
            fully_shard(module, mesh=unit_mesh, reshard_after_forward=None if raf_children else False, **mp)
        else:
            fully_shard(module, mesh=unit_mesh, reshard_after_forward=raf_children, **mp)

    if case.mode == "prefetch":
        fwd, bwd = case_lib.prefetch_lists(case.scenario)
        for unit, targets in fwd.items():
            modules[unit].set_modules_to_forward_prefetch([modules[t] for t in targets])
        for unit, targets in bwd.items():
            modules[unit].set_modules_to_backward_prefetch([modules[t] for t in targets])

    params = list(model.parameters())  # DTensors now; tied once
    optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)

    losses, norms, collectives, events = [], [], [], []
    tensors = {}
    for step in range(case.steps):
        _REC["collectives"], _REC["events"] = [], []
        _REC["on"] = True
        optimizer.zero_grad(set_to_none=True)
        micro = case.micro_batches
        step_losses = []
        for m in range(micro):
            last = m == micro - 1
            if case.mode == "hsdp_noar":
                model.set_requires_all_reduce(last)
            elif case.mode in case_lib.ACCUM_MODES:
                model.set_requires_gradient_sync(last)
                model.set_reshard_after_backward(last)
            loss = twin.loss_fn(model, inputs[step * micro + m])
            loss.backward()
            step_losses.append(loss)
        norm = torch.nn.utils.clip_grad_norm_(params, case_lib.CLIP_MAX_NORM) if case.mode == "clip" else None
        optimizer.step()
        _REC["on"] = False
        if norm is not None:  # a DTensor: its value gathered outside the recording
            norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item())
        losses.extend(loss.item() for loss in step_losses)
        collectives.append(_REC["collectives"])
        events.append(_REC["events"])
        # Gathering full tensors issues collectives: outside the recording.
        for n, p in model.named_parameters():
            tensors[f"step/{step}/param/{n}"] = _plain(p.full_tensor()).detach().clone()
            if p.grad is not None:
                tensors[f"step/{step}/grad/{n}"] = _plain(p.grad.full_tensor()).detach().clone()
    torch.save(tensors, os.path.join(case_dir, f"fsdp2_rank{rank}.pt"))
    with open(os.path.join(case_dir, f"fsdp2_rank{rank}.json"), "w") as f:
        json.dump({"case": case.name, "rank": rank, "torch": torch.__version__, "losses": losses, "norms": norms,
                   "collectives": collectives, "events": events}, f, indent=1)


# ---------------------------------------------------------------------------
# The launcher: one forked process per rank, per case.


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case, root, timeout_s):
    import torch.multiprocessing as mp

    case_dir = os.path.join(root, case.name)
    os.makedirs(case_dir, exist_ok=True)
    for r in range(case.world):
        for ext in ("json", "pt"):
            path = os.path.join(case_dir, f"fsdp2_rank{r}.{ext}")
            if os.path.exists(path):
                os.remove(path)
    error_path = os.path.join(case_dir, "fsdp2_error.txt")
    if os.path.exists(error_path):
        os.remove(error_path)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run_rank, args=(r, case, case_dir, port, queue)) for r in range(case.world)]
    start = time.time()
    for p in procs:
        p.start()
    errors = {}
    reported = 0
    while reported < case.world and time.time() - start < timeout_s:
        try:
            rank, err = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        reported += 1
        if err:
            errors[rank] = err
    for p in procs:
        p.join(timeout=max(1.0, timeout_s - (time.time() - start)))
        if p.is_alive():
            p.kill()
            p.join()
    if reported < case.world and not errors:
        errors[-1] = (f"only {reported} of {case.world} ranks reported within {timeout_s} s "
                      f"(exit codes {[p.exitcode for p in procs]})")
    for r, p in enumerate(procs):
        if p.exitcode not in (0, None) and r not in errors and -1 not in errors:
            errors[r] = f"exit code {p.exitcode}"
    if errors:
        with open(error_path, "w") as f:
            for r, err in sorted(errors.items()):
                f.write(f"--- rank {r} ---\n{err}\n")
    return errors, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="directory holding one subdirectory per case")
    parser.add_argument("--case", action="append", default=[])
    parser.add_argument("--cases-file")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    args = parser.parse_args()
    names = list(args.case)
    if args.cases_file:
        with open(args.cases_file) as f:
            names += [line.strip() for line in f if line.strip()]
    if not names:
        parser.error("no cases")
    failed = 0
    for name in names:
        case = case_lib.parse_case(name)
        errors, seconds = run_case(case, args.root, args.timeout)
        if errors:
            failed += 1
            first = next(iter(sorted(errors.items())))
            print(f"FSDP2 {name}: FAILED ({seconds:.1f} s): rank {first[0]}:\n{first[1]}", flush=True)
        else:
            print(f"FSDP2 {name}: ok ({seconds:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
