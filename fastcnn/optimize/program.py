"""A CPU forward of fastcnn.optimize's graph as one list of steps, one program per input
signature: the fused layers' kernels called directly, with no nn.Module call, graph code,
plan lookup or output recycling between them.

At batch 1 a ResNet-50 runs 53 convolutions; each fused module call spends ~11 us of Python
around its kernel, and ~30 us inside a forward, whose kernels evict the interpreter's code and
data from the caches (benchmarks/cpu_ab.py --switch program measures the whole). A program
resolves everything once for an input signature (shape, strides, dtype, inference mode, thread
count, the backend in force): each convolution's oneDNN plan, each pool's and Inception block's
kernel, and buffers of its own for the values between them, reused as soon as a value is dead
(at most a handful live at once, as a runtime's memory planner does). A call then runs the
steps: a conv step is the packed-weight lookup (a weight changed in place is packed again) and
the kernel call.

Safe by construction, or not used:
- only nodes it knows run as steps: fastcnn's ConvBNAct (oneDNN's direct path), MaxPool2d and
  FusedInception; nn.Linear, AdaptiveAvgPool2d, Flatten, Dropout (eval), Identity and
  torch.flatten through their own calls. Anything else: no program (the reason noted once);
- the program's buffers never leave it: the output, where it is one of them, is copied;
- each call first checks that every module is the one the program was made from, with the
  same weight and bias tensors, attributes and no hooks, that the graph's code is the same and
  the model in eval mode; else the module path runs, and the program is made again;
- one call at a time per model (other threads take the module path meanwhile);
- a program is verified once when made: its output must equal the module path's exactly;
- its buffers count in fastcnn.set_cache_budget's budget (a program that does not fit is not
  made; one evicted is made again).
Not used while fastcnn.trace records (a trace wants each layer's own kernel pick), under
autograd, torch.compile or a dispatch mode, or for anything but one channels_last CPU tensor.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections import OrderedDict

import torch
from torch import fx, nn

from fastcnn import _backend, _trace
from fastcnn.common import alloc
from fastcnn.common.dispatch import can_skip_dispatcher
from fastcnn.cpu import onednn, pool
from fastcnn.nn import ConvBNAct, FusedInception
from fastcnn.nn import MaxPool2d as PoolModule
from fastcnn.nn.fused_inception import _BUFFERS as _INCEPTION_TENSORS
from fastcnn.optimize.verify import relative_error

MAX_PROGRAMS = 4  # input signatures kept per model (each holds its buffers)
# A program's output against the module path's, relative to the largest value (its global pool
# and classifier are other kernels than aten's: summed in another order)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# Stateless modules and functions a program calls as they are: their outputs are new tensors or
# views of their input, never kept by them
_CALLED_MODULES = (nn.Linear, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_CALLED_FUNCTIONS = (torch.flatten, operator.getitem)


class Unsupported(Exception):
    """Why a graph or an input gets no program."""


# What each kind of step bakes in, compared on every call: tensors by id (a program also
# watches them: one that dies makes it stale, so that a new tensor at the same id is no match)
def _conv_state(m) -> tuple:
    b = m._buffers
    return (id(b["weight"]), id(b["bias"]), m.relu, m.overwrite_residual, m.stride, m.padding,
            m.groups, m.dilation, m.backend)  # fmt: skip


def _inception_state(m) -> tuple:
    b = m._buffers
    return (*[id(b[n]) for n in _INCEPTION_TENSORS], tuple(m.widths), m.pool, m.backend)


def _pool_state(m) -> tuple:
    return (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _avg_pool_state(m) -> tuple:
    return (m.output_size,)


def _linear_state(m) -> tuple:
    # the data pointers too: `weight.data = ...` keeps the Parameter, not the program's view
    w, b = m._parameters["weight"], m._parameters["bias"]
    return (id(w), id(b), w.data_ptr(), w.shape, None if b is None else b.data_ptr())


def _global_pool(m: nn.AdaptiveAvgPool2d, x: torch.Tensor) -> bool:
    """Does the extension's global average pool take m on x?"""
    size = m.output_size
    ones = size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))
    return ones and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class _Memory:
    """The program's buffers: one per value that needs its own, reused once dead."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self._free: dict[tuple, list[int]] = {}
        self.nbytes = 0

    def take(self, shape, strides, like: torch.Tensor) -> int:
        key = (tuple(shape), tuple(strides), like.dtype)
        free = self._free.get(key)
        if free:
            return free.pop()
        t = torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)
        self.buffers.append(t)
        self.nbytes += t.untyped_storage().nbytes()
        return len(self.buffers) - 1

    def give_back(self, index: int) -> None:
        t = self.buffers[index]
        self._free.setdefault((tuple(t.shape), t.stride(), t.dtype), []).append(index)


class Program:
    """The steps of one input signature. run(x) -> the output, or None where a module changed
    since (the caller then takes the module path and makes the program again)."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor) -> None:
        self._gm, self._code = gm, gm._code
        self._steps: list = []  # step(slots): each writes its node's slot
        self._checks: list = []  # (parent._modules, name, module, state function, state)
        self._keep: list[torch.Tensor] | None = None  # the buffers (KeptOutputs may drop them)
        self._watched: list[weakref.ref] = []  # the modules' tensors (one dying: stale)
        values, memory = _shapes(gm, x), _Memory()
        nodes = list(gm.graph.nodes)
        last_use = {n: i for i, node in enumerate(nodes) for n in node.all_input_nodes}
        slot_of: dict[fx.Node, int] = {}
        buffer_of: dict[int, int] = {}  # slot -> buffer index (slots of program memory)
        holders: dict[int, int] = {}  # buffer index -> live slots on it
        output = None
        for i, node in enumerate(nodes):
            if node.op == "output":
                output = node.args[0]
                break
            slot = slot_of[node] = len(slot_of)
            buffer = self._step(node, slot, slot_of, values, memory, buffer_of)
            if buffer is not None:
                buffer_of[slot] = buffer
                holders[buffer] = holders.get(buffer, 0) + 1
            # the values dead after this node (read last here, or never) free their buffer
            dead = [n for n in node.all_input_nodes if last_use.get(n) == i]
            for n in [*dict.fromkeys(dead), *([] if node.users else [node])]:
                b = buffer_of.get(slot_of[n])
                if b is not None:
                    holders[b] -= 1
                    if holders[b] == 0:
                        memory.give_back(b)
        if not isinstance(output, fx.Node):
            raise Unsupported("the graph returns more than one tensor")
        self._out_slot = slot_of[output]
        self._out_is_buffer = self._out_slot in buffer_of
        self._n_slots = len(slot_of)
        self._keep = memory.buffers
        self.nbytes = memory.nbytes
        self.reference = values[output]

    def _step(self, node, slot, slot_of, values, memory, buffer_of) -> int | None:
        """Appends node's step; returns the buffer it writes (None: a new tensor each call)."""
        if node.op == "placeholder":
            if slot != 0:
                raise Unsupported("the graph takes more than one input")
            return None
        value = values[node]
        if not isinstance(value, torch.Tensor):
            raise Unsupported(f"{node.name} gives a {type(value).__name__}, not a tensor")
        if node.op == "call_module":
            parent_name, _, name = node.target.rpartition(".")
            parent = self._gm.get_submodule(parent_name)
            module = parent._modules[name]
            return self._module_step(node, module, parent, name, slot, slot_of, values, memory,
                                     buffer_of)  # fmt: skip
        if node.op == "call_function" and node.target in _CALLED_FUNCTIONS:
            self._call_step(node, node.target, slot, slot_of)
            return _alias(value, node, slot_of, values, buffer_of)
        raise Unsupported(f"{node.op} {getattr(node.target, '__name__', node.target)} "
                          f"({node.name})")  # fmt: skip

    def _module_step(self, node, module, parent, name, slot, slot_of, values, memory, buffer_of):
        if _hooked(module):
            raise Unsupported(f"{node.target} has forward hooks")
        x_node = node.args[0]
        x = values[x_node]
        if not isinstance(x, torch.Tensor) or x_node not in slot_of:
            raise Unsupported(f"{node.target} does not take a tensor of the graph")
        xs = slot_of[x_node]
        value = values[node]
        if isinstance(module, ConvBNAct):
            res_node = node.kwargs.get("residual", node.args[1] if len(node.args) > 1 else None)
            if set(node.kwargs) - {"residual"} or len(node.args) > 2:
                raise Unsupported(f"{node.target} is called with out=")
            rs = None if res_node is None else slot_of[res_node]
            residual = None if res_node is None else values[res_node]
            in_place = module.overwrite_residual and residual is not None
            w, b = module._buffers["weight"], module._buffers["bias"]
            plan = module._plan(x, residual, w, b, in_place)
            if (not isinstance(plan, onednn.ConvPlan) or plan.packer is None or plan.copy
                    or plan._dense_bias):  # fmt: skip
                raise Unsupported(f"{node.target} does not take oneDNN's direct path")
            if in_place and rs not in buffer_of:
                raise Unsupported(f"{node.target} would overwrite a tensor the program does "
                                  "not own (the model's input)")  # fmt: skip
            out = buffer_of[rs] if in_place else memory.take(*plan._out, x)
            self._check(parent, name, module, _conv_state)
            target = memory.buffers[out]
            conv = _conv_call(plan, x, w, b, target if in_place else residual, target)

            def step(slots, xs=xs, rs=rs, m=module._buffers, slot=slot):
                conv(slots[xs], m["weight"], m["bias"], None if rs is None else slots[rs])
                slots[slot] = target

            self._steps.append(step)
            return out
        if isinstance(module, PoolModule):
            window = (module.kernel_size, module.stride or module.kernel_size, module.padding)
            k, s, p = (_first(v) for v in window)
            why = module.unsupported_reason(module) or pool.unsupported_reason(
                x, k, s, p, module.ceil_mode
            )
            if why:
                raise Unsupported(f"{node.target}: {why}")
            out = memory.take(value.shape, value.stride(), x)
            self._check(parent, name, module, _pool_state)
            target, ceil = memory.buffers[out], module.ceil_mode

            def step(slots, xs=xs, slot=slot):
                slots[slot] = pool.max_pool2d(slots[xs], k, s, p, ceil, target)

            self._steps.append(step)
            return out
        if isinstance(module, FusedInception):
            buffers = module._buffers
            run = module._plan(x, [buffers[n] for n in _INCEPTION_TENSORS])
            if not getattr(run, "takes_out", False):
                raise Unsupported(f"{node.target} does not take oneDNN's direct path")
            out = memory.take(value.shape, value.stride(), x)
            self._check(parent, name, module, _inception_state)
            target = memory.buffers[out]

            def step(slots, xs=xs, slot=slot):
                slots[slot] = run(slots[xs], *[buffers[n] for n in _INCEPTION_TENSORS],
                                  out=target)  # fmt: skip

            self._steps.append(step)
            return out
        if isinstance(module, nn.AdaptiveAvgPool2d) and _global_pool(module, x):
            out = memory.take(value.shape, value.stride(), x)
            self._check(parent, name, module, _avg_pool_state)
            target, pool_out = memory.buffers[out], onednn.linked_extension().global_avg_pool_out

            def step(slots, xs=xs, slot=slot):
                pool_out(slots[xs], target)
                slots[slot] = target

            self._steps.append(step)
            return out
        if isinstance(module, nn.Linear) and x.dim() == 2 and x.is_contiguous():
            # as a 1x1 conv of the [N, C, 1, 1] view: oneDNN's direct path, packed weight
            n, c = x.shape
            w4 = module.weight.detach().view(module.out_features, c, 1, 1)
            x4, bias = x.view(n, c, 1, 1), module.bias
            plan = onednn.plan(x4, w4, bias, (1, 1), (0, 0), 1, None, False)
            if plan.packer is not None and plan.copy is None and not plan._dense_bias:
                out = memory.take(*plan._out, x)
                self._check(parent, name, module, _linear_state)
                target = memory.buffers[out]
                y = target.view(n, module.out_features)
                conv = _conv_call(plan, x4, w4, bias, None, target)

                def step(slots, xs=xs, slot=slot, m=module._parameters):
                    conv(slots[xs].view(n, c, 1, 1), w4, m["bias"], None)
                    slots[slot] = y

                self._steps.append(step)
                return out
        if isinstance(module, _CALLED_MODULES) and not module.training:
            self._check(parent, name, module, None)
            self._call_step(node, module, slot, slot_of)
            return _alias(value, node, slot_of, values, buffer_of)
        raise Unsupported(f"{type(module).__name__} ({node.target})")

    def _call_step(self, node, fn, slot, slot_of) -> None:
        """A step that calls fn as the graph does (its arguments' nodes read from their slots)."""
        args = fx.node.map_arg(node.args, lambda n: _Slot(slot_of[n]))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _Slot(slot_of[n]))

        def step(slots):
            def read(a):
                return slots[a.index] if type(a) is _Slot else a

            slots[slot] = fn(*[read(a) for a in args], **{k: read(v) for k, v in kwargs.items()})

        self._steps.append(step)

    def _check(self, parent, name, module, state) -> None:
        made = None if state is None else state(module)
        self._checks.append((parent._modules, name, module, state, made))
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None:
                self._watched.append(weakref.ref(t, self._died))

    def _died(self, _ref) -> None:  # a garbage collector callback: no lock taken here
        self._keep = None

    def current(self) -> bool:
        """Is every module the one this program was made from, as it was, hooks-free?"""
        if self._gm._code is not self._code or self._keep is None:
            return False
        for modules, name, module, state, made in self._checks:
            if modules.get(name) is not module or _hooked(module):
                return False
            if state is not None and state(module) != made:
                return False
        return True

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        buffers = self._keep
        if buffers is None:
            return None
        alloc.kept_outputs.touch(self)
        if alloc._poison is not None:  # tests: an element no step writes shows as poison
            for t in buffers:
                alloc._fill(t)
        slots: list = [None] * self._n_slots
        slots[0] = x
        try:
            for step in self._steps:
                step(slots)
        except _Changed:
            return None
        y = slots[self._out_slot]
        return y.clone() if self._out_is_buffer or _on_buffers(y, buffers) else y


def _conv_call(plan: onednn.ConvPlan, x, weight, bias, residual, target):
    """call(x, weight, bias, residual): plan's conv of these tensors' metadata into target,
    prepared once (the extension's OnednnPreparedConv: no per-call primitive lookup, memory
    objects or argument map) while the Winograd switch reads as it did here, else the plan's
    own direct call. Raises _Changed where oneDNN has no kernel for it (the module path runs)."""
    packer, direct = plan.packer, plan._direct
    prepared = None
    if not packer.winograd_now():
        packed, layout = packer(weight, False)
        ready = onednn.linked_extension().OnednnPreparedConv(
            x, packed, layout, list(plan._w_shape), bias, residual, target, *plan._args
        )
        prepared = ready.run if ready.ok() else None

    def call(x, weight, bias, residual):
        winograd = packer.winograd_now()
        if prepared is not None and not winograd:
            prepared(x, packer(weight, False)[0], bias, residual, target)
        elif direct(x, weight, bias, residual, target, winograd) is None:
            raise _Changed

    return call


class _Changed(Exception):
    pass


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _first(v) -> int:
    return v if isinstance(v, int) else v[0]


def _on_buffers(y: torch.Tensor, buffers) -> bool:
    ptr = y.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == ptr for t in buffers)


def _alias(value, node, slot_of, values, buffer_of) -> int | None:
    """The buffer a called step's output lives on: its input's where it is a view of it (e.g.
    flatten), None where it is a new tensor."""
    ptr = value.untyped_storage().data_ptr()
    for n in node.all_input_nodes:
        v = values[n]
        if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr:
            return buffer_of.get(slot_of[n])
    return None


def _shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict:
    """Each node's value on x, by the module path (the program's reference)."""
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):  # values held here are never recycled by their plans
            values[n] = result = super().run_node(n)
            return result

    Recorder(gm).run(x)
    return values


def gate(gm: nn.Module, x) -> str | None:
    """Why this call cannot run a program (None: it may)."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 4:
        return "not one 4-D CPU tensor"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "the input is not channels_last"
    if gm.training or not can_skip_dispatcher(x) or _trace.active():
        return "training, autograd, tracing or a trace"
    if alloc.kept_outputs.budget == 0:
        return "fastcnn.set_cache_budget(0)"
    return None


class Programs:
    """A model's programs, one per input signature (the last MAX_PROGRAMS), and the lock that
    lets one call at a time run them. Not copied or pickled: a copy makes its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._programs: OrderedDict[tuple, Program | str] = OrderedDict()

    def __deepcopy__(self, memo) -> Programs:
        return Programs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()

    def clear(self) -> None:
        """Drop every program (fastcnn.refresh: made again on the next call)."""
        with self._lock:
            for program in self._programs.values():
                if isinstance(program, Program):
                    alloc.kept_outputs.forget(program)
            self._programs.clear()

    def run(self, gm: fx.GraphModule, module_path, x: torch.Tensor):
        """gm's output on x: by its program where one applies, else by module_path(x)."""
        if gate(gm, x) is not None or not self._lock.acquire(blocking=False):
            return module_path(x)
        try:
            key = (x.shape, x.stride(), x.dtype, torch.is_inference_mode_enabled(),
                   torch.get_num_threads(), _backend.get_backend())  # fmt: skip
            program = self._programs.get(key)
            if isinstance(program, str):  # no program for this signature (noted when made)
                return module_path(x)
            if program is not None and program.current():
                y = program.run(x)
                if y is not None:
                    return y
            return self._make(gm, key, x, module_path)
        finally:
            self._lock.release()

    def _make(self, gm, key, x, module_path):
        """Makes the program for key, verified against the module path; returns the output."""
        old = self._programs.pop(key, None)
        if isinstance(old, Program):
            alloc.kept_outputs.forget(old)
        start = alloc.kept_outputs.calls  # the module path's outputs from here on may give way
        try:
            program = Program(gm, x)
            kept = alloc.kept_outputs.keep(program, program.nbytes, displace_from=start)
            y = program.run(x) if kept else None
            if y is None:
                raise Unsupported("its buffers do not fit fastcnn.set_cache_budget's budget")
            error, program.reference = relative_error(y, program.reference), None
            if not error <= TOLERANCE.get(y.dtype, 0.0):
                raise Unsupported(f"its output differs from the module path's ({error:.1e})")
        except (Unsupported, RuntimeError) as why:  # a program that cannot be made: not used
            _backend.note_once(
                ("program", str(why)),
                f"fastcnn: this model runs module by module on the CPU, not as one program: {why}",
            )
            self._remember(key, str(why))
            return module_path(x)
        self._remember(key, program)
        return y

    def _remember(self, key, value) -> None:
        self._programs[key] = value
        while len(self._programs) > MAX_PROGRAMS:
            _, dropped = self._programs.popitem(last=False)
            if isinstance(dropped, Program):
                alloc.kept_outputs.forget(dropped)

    def reason(self, x: torch.Tensor) -> str | None:
        """Why gm's last calls on tensors like x did not run a program (None: they did)."""
        for key, value in self._programs.items():
            if key[:3] == (x.shape, x.stride(), x.dtype):
                return value if isinstance(value, str) else None
        return "no program made for this input signature"


def install(gm: fx.GraphModule) -> None:
    """gm's forward runs its programs on the CPU (the module path otherwise): its generated
    class's forward wrapped. A recompile() replaces the wrapper with the plain forward (then
    every call takes the module path, as the code changed)."""
    cls = type(gm)
    plain = cls.forward
    gm._fastcnn_programs = Programs()

    def forward(self, *args, **kwargs):
        programs = self.__dict__.get("_fastcnn_programs")
        if programs is None or kwargs or len(args) != 1:
            return plain(self, *args, **kwargs)
        return programs.run(self, lambda x: plain(self, x), args[0])

    forward.__doc__ = plain.__doc__
    cls.forward = forward
