"""fastcnn.cuda_graphs(model): a model replayed from CUDA graphs, one per input signature.

At batch 1 a GPU runs a ResNet-50 forward in about a millisecond, about what Python spends
launching its ~55 fused kernels (benchmarks/host_overhead.py). A CUDA graph records every launch
of one forward once and replays them with one call, so the host cost no longer depends on the
model. This is what torch.compile(mode="reduce-overhead") does for its own graphs; here it wraps
any model, a fastcnn.optimize result included (also `fastcnn.optimize(model, cuda_graphs=True)`).

The first call with a new input signature (shape, strides, dtype, device; and the state that
changes what a forward records: inference mode, autocast, train/eval, fastcnn's backend) runs
the model a few times on a side stream (Triton autotunes and compiles, plans are made, outside
the capture), then captures one forward into a graph that reads a static input buffer. Each
later call copies the input into that buffer, replays, and returns a copy of the graph's output
(the graph overwrites its output buffer on every replay: a returned tensor is never changed by a
later call).
At most `max_graphs` signatures are kept (the least recently used is dropped), each holding its
graph's memory. Calls from several threads or streams are safe: one replay at a time per wrapper,
each call's stream waiting for the previous replay's copies (an event) before it refills the
input buffer. Replays run no Python inside the model: fastcnn.trace and fastcnn.report's kernel
list see nothing of them (trace the model itself).

A graph replays the weights it read at capture, by address. Before each replay the wrapper
compares the address and version counter of every parameter and buffer the model had at capture
(cheap, and hidden behind the previous replay's GPU work), so a weight changed in place
(load_state_dict on the inner model, `.data =`, an optimizer step) means a new capture: derived
tensors such as a merged Inception weight are computed in Python, at capture only.
load_state_dict and .to() on the wrapper drop every graph. Not seen (call reset() after one): a
parameter or buffer replaced by another tensor object inside the model (`conv.weight = ...`), and
an in-place change to a tensor made under torch.inference_mode (it has no version counter).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from fastcnn import _backend

MAX_GRAPHS = 8
WARMUP_CALLS = 3  # side-stream calls before a capture: autotuning, compilation, plans, caches


class _Captured:
    __slots__ = ("done", "graph", "signature", "static_input", "static_output", "weights")

    def __init__(self, graph, static_input, static_output, weights):
        self.graph, self.static_input = graph, static_input
        self.static_output, self.weights = static_output, weights
        self.signature = _signature(weights)
        self.done = None  # an event after the last replay's copies, on the stream that ran it


_capture_lock = threading.Lock()
# What a captured forward may return: tensors (copied out), containers pytree knows, plain values
_PLAIN = (int, float, bool, str, type(None))


def _check_outputs(output) -> None:
    for leaf in tree_leaves(output):
        if not isinstance(leaf, (torch.Tensor, *_PLAIN)):
            raise TypeError(
                "fastcnn.cuda_graphs: the model returned a "
                f"{type(leaf).__name__}, which cannot be copied out of the graph's buffers "
                "(return tensors, or tuples/lists/dicts of them)"
            )


def _signature(tensors: tuple) -> tuple:
    """Address and version of each tensor (inference tensors: address only)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


class _Graphs:
    """The captured graphs, bounded, with the lock that serializes captures and replays (they
    share static buffers). A copied or unpickled wrapper starts with none."""

    def __init__(self) -> None:
        self.by_key: OrderedDict[tuple, _Captured] = OrderedDict()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo) -> _Graphs:
        return _Graphs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class CUDAGraphed(nn.Module):
    """`model` run by replaying one CUDA graph per input signature (see the module docstring).

    forward(x) takes one CUDA tensor (the model's single input) and returns what the model
    returns, copied out of the graph's buffers. For inference: calls run under torch.no_grad.
    """

    def __init__(self, model: nn.Module, max_graphs: int = MAX_GRAPHS):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastcnn.cuda_graphs expects an nn.Module, got {type(model).__name__}")
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(
                f"fastcnn.cuda_graphs: max_graphs must be an int >= 1, got {max_graphs!r}"
            )
        self.model = model
        self.max_graphs = max_graphs
        self._graphs = _Graphs()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs.by_key)

    def reset(self) -> None:
        """Drop every captured graph (the next call captures anew)."""
        with self._graphs.lock:
            self._graphs.by_key.clear()

    def _apply(self, fn, recurse=True):
        self.reset()  # .to(), .half(), .cuda(): the graphs read the old tensors
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.reset()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"fastcnn.cuda_graphs: the input must be a tensor, got {type(x).__name__}"
            )
        if x.device.type != "cuda":
            raise ValueError(
                f"fastcnn.cuda_graphs: CUDA graphs need a CUDA input, got one on {x.device}"
            )
        if torch.compiler.is_compiling():
            return self.model(x)  # torch.compile makes its own graphs
        key = (
            x.shape, x.stride(), x.dtype, x.device,
            # what else changes the work a forward records
            torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"), self.model.training, _backend.get_backend(),
        )  # fmt: skip
        graphs = self._graphs.by_key
        with self._graphs.lock, torch.no_grad(), torch.cuda.device(x.device):
            captured = graphs.get(key)
            if captured is not None and captured.signature != _signature(captured.weights):
                del graphs[key]  # a weight changed in place: the graph would replay stale values
                captured = None
            if captured is None:
                captured = self._capture(x, key)
            else:
                graphs.move_to_end(key)  # least recently used goes first
            stream = torch.cuda.current_stream(x.device)
            if captured.done is not None:  # the last replay may be on another stream, and
                stream.wait_event(captured.done)  # still reading or writing the static buffers
            captured.static_input.copy_(x)
            captured.graph.replay()
            result = tree_map(_copy_out, captured.static_output)
            captured.done = torch.cuda.Event()
            captured.done.record(stream)
            return result

    def _capture(self, x: torch.Tensor, key: tuple) -> _Captured:
        # dense strides for an input that overlaps itself (expand): a buffer the copy can fill
        static_input = torch.empty_like(x, memory_format=torch.preserve_format)
        static_input.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.model(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # one capture at a time in the process; other threads' CUDA calls do not break it
        with (
            _capture_lock,
            torch.cuda.graph(
                graph, stream=torch.cuda.Stream(device=x.device), capture_error_mode="thread_local"
            ),
        ):
            static_output = self.model(static_input)
        _check_outputs(static_output)
        weights = (*self.model.parameters(), *self.model.buffers())
        captured = _Captured(graph, static_input, static_output, weights)
        graphs = self._graphs.by_key
        while len(graphs) >= self.max_graphs:
            graphs.popitem(last=False)  # the least recently used signature
        graphs[key] = captured
        return captured

    def extra_repr(self) -> str:
        return f"max_graphs={self.max_graphs}, captured={self.num_graphs}"


def _copy_out(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def cuda_graphs(model: nn.Module, max_graphs: int = MAX_GRAPHS) -> CUDAGraphed:
    """`model` replayed from CUDA graphs, one captured per input signature (CUDAGraphed)."""
    return CUDAGraphed(model, max_graphs)
