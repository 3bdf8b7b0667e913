"""A model's dataflow as torch.fx traces it: residual additions and the norms on their main paths.

`placement="last"` and `fuse_bnet` need to know what feeds what, which a module tree does not say
(registration order is not call order, and a residual addition is not a module). This module traces the
model symbolically with `torch.fx`, norms as leaves, and reads the graph:

- **Residual additions**: an ``add`` of two tensors where one operand (the *shortcut*) is either a tensor
  the other operand was computed from (an identity shortcut) or the result of module calls and slices only
  applied to such a tensor (a projection shortcut: ``downsample``, ``idpath``; DPN's ``x_s[:, :c]``). The other
  operand is the *main path*; its norms are the nodes computed after the branch point, and its *last norm*
  the latest one every path of the branch passes through (none where the branch ends in a sum of parallel
  re-parameterisation branches). Additions of two slices of one split (Res2Net's hierarchical
  ``sp + spx[i]``) or of two parallel branches with equally many norms are not residual additions.
- **Conv -> norm pairs**: a norm whose only input is a convolution's output, used by nothing else.

Tracing uses timm's no-trace registries (its norm+act layers and wrapped functions are leaves). A module
that fx cannot trace is itself treated as a leaf, and its children are traced on their own, so one
untraceable attention layer does not hide every block around it; `opaque` lists such modules so that
callers can fall back on registries of block classes for them.
"""
from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnet_fastai.nn.layers import _BNETNd

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_norm(m: nn.Module) -> bool:
    """A BatchNorm (any `_BatchNorm` subclass) or a BNET."""
    return isinstance(m, (_BatchNorm, _BNETNd))


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaves, self._notrace = leaves, tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (is_norm(m) or id(m) in self._leaves or isinstance(m, self._notrace)
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module, leaves: set[int]) -> fx.Graph | None:
    try:
        return _Tracer(leaves).trace(module)
    except Exception:  # noqa: BLE001 - fx raises many kinds for code it cannot follow; all mean "untraceable"
        return None


@dataclass
class Traced:
    """The graphs covering a model: `units` are (prefix, module, graph); `opaque` the names fx could not trace."""

    units: list[tuple[str, nn.Module, fx.Graph]] = field(default_factory=list)
    opaque: dict[str, nn.Module] = field(default_factory=dict)


def holds_norms(m: nn.Module) -> bool:
    """A module that is no norm but holds some: where a graph treats it as a leaf, its norms are hidden in it."""
    return not is_norm(m) and any(is_norm(c) for c in m.modules())


def trace(model: nn.Module) -> Traced:
    """Trace `model` whole if fx can; else every module fx can trace, untraceable ones as leaves. Either way, a
    module timm marks not to trace (``register_notrace_module``: LiteMLA, LocalWindowAttention ...) that holds
    norms is a leaf of the graph around it: it is listed in `opaque`, and its parts fx can trace are traced."""
    graph = _trace(model, set())
    if graph is None:
        return _trace_parts(model)
    traced = Traced([("", model, graph)])
    notrace = tuple(get_notrace_modules())
    hidden = [n for n, m in model.named_modules() if n and isinstance(m, notrace) and holds_norms(m)]
    for name in hidden:
        if any(name.startswith(h + ".") for h in hidden):
            continue  # inside another: traced with it
        inner = _trace_parts(model.get_submodule(name), whole=False)
        traced.units += [(_join(name, p), m, g) for p, m, g in inner.units]
        traced.opaque.update({_join(name, n): m for n, m in inner.opaque.items()})
    return traced


def _join(prefix: str, name: str) -> str:
    """The qualified name of `name` inside the module named `prefix`."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _trace_parts(model: nn.Module, whole: bool = True) -> Traced:
    """Every module of `model` fx can trace, untraceable ones (and `model` itself unless `whole`) as leaves."""
    named = [(n, m) for n, m in model.named_modules() if not is_norm(m)]
    leaves: set[int] = set() if whole else {id(model)}
    graphs: dict[str, fx.Graph] = {}
    probe, notrace = _Tracer(leaves), tuple(get_notrace_modules())
    for name, m in reversed(named):  # every descendant before its ancestors
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):  # never called: their children are traced on their own
            leaves.add(id(m))
            continue
        if probe.is_leaf_module(m, name) and name:
            if isinstance(m, notrace) and holds_norms(m):
                leaves.add(id(m))  # timm's not-to-trace module: a leaf around norms, whose parts are traced
            continue
        g = _trace(m, leaves) if name or whole else None
        if g is None:
            leaves.add(id(m))
        else:
            graphs[name] = g
    traced = Traced()
    opaque_names = {n for n, m in named if id(m) in leaves}
    traced.opaque = {n: m for n, m in named if n in opaque_names}
    containers = {n for n, m in named if isinstance(m, (nn.ModuleList, nn.ModuleDict))}

    def caller(name: str) -> str:  # the module whose forward calls `name`: its parent, past containers
        parent = name.rpartition(".")[0]
        return caller(parent) if parent and parent in containers else parent

    for name, g in graphs.items():  # the outermost traced modules: the model, or those inside an untraced one
        if not name or caller(name) in opaque_names:  # (a traced module's graph covers its containers' children)
            traced.units.append((name, model.get_submodule(name), g))
    return traced


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _norm_nodes(nodes, root: nn.Module, hidden: bool = False) -> list[fx.Node]:
    """The calls of norms among `nodes`; `hidden`: also of leaf modules that hold norms (`holds_norms`)."""
    def wanted(m: nn.Module) -> bool:
        return is_norm(m) or (hidden and holds_norms(m))

    return [n for n in nodes if n.op == "call_module" and wanted(root.get_submodule(n.target))]


def _dominates(norm: fx.Node, end: fx.Node, own: set[fx.Node]) -> bool:
    """Whether every path from outside `own` (the branch point) to `end` passes through `norm`."""
    seen, todo = set(), [end]
    while todo:
        n = todo.pop()
        if n is norm or n in seen:
            continue
        if n not in own:
            return False
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return True


def _shortcut_ok(short: fx.Node, own_short: set[fx.Node], own_main: set[fx.Node], up_main: set[fx.Node]) -> bool:
    """Whether `short` is a shortcut of a main path computed from the same tensor.

    Its own nodes are module calls (a projection: ``downsample``, ``idpath``) or slices (``[:, :c]``, DPN's dual
    path) of one tensor the main path was computed from; a slice only where the main path takes that tensor
    whole, so that two slices of one split (Res2Net's ``sp + spx[i]``) are not a residual addition.
    """
    sliced = any(n.op == "call_function" and n.target is operator.getitem for n in own_short)
    if any(n.op != "call_module" and not (n.op == "call_function" and n.target is operator.getitem)
           for n in own_short):
        return False  # the shortcut does more than module calls and slices: concatenations, arithmetic
    inputs = {i for n in own_short for i in n.all_input_nodes} - own_short if own_short else {short}
    if len(inputs) != 1 or not inputs <= up_main:
        return False  # the shortcut does not start from a tensor the main path was computed from
    source = next(iter(inputs))
    return not sliced or any(source in n.all_input_nodes and not (n.op == "call_function"
                                                                   and n.target is operator.getitem)
                             for n in own_main)


def residual_additions(root: nn.Module, graph: fx.Graph) -> Iterator[tuple[list[str], str | None]]:
    """For each residual addition in `graph`: its main path's norms (targets relative to `root`, in order) and
    the main path's *last norm*, or None where it has none.

    The last norm is the latest norm that every path of the main branch passes through, and not one applied
    to the block's raw input. So a main path that ends in a sum of parallel branches (re-parameterisable
    blocks: RepVGG, MobileOne, FastViT's RepMixer) has none, and neither does a pre-norm block whose only norm
    normalises its input. A leaf module holding norms (one fx cannot trace, or timm marks not to trace) counts
    as a norm here: where it is the latest, the target given is that module's, and its own last norm is the
    caller's to find (`holds_norms` tells the two apart).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        up = {a: _ancestors(a) | {a}, b: _ancestors(b) | {b}}
        own = {a: up[a] - up[b], b: up[b] - up[a]}
        norms = {x: _norm_nodes(own[x], root, hidden=True) for x in (a, b)}
        main, short = (a, b) if len(norms[a]) > len(norms[b]) else (b, a)
        if len(norms[main]) == len(norms[short]):
            continue  # parallel branches (or no norm at all): no main path to speak of
        if not _shortcut_ok(short, own[short], own[main], up[main]):
            continue
        ordered = sorted(norms[main], key=order.__getitem__)
        last = next((n for n in reversed(ordered) if _dominates(n, main, own[main])
                     and (all(i in own[main] for i in n.all_input_nodes)  # not a norm of the block's input ...
                          or holds_norms(root.get_submodule(n.target)))), None)  # ... unless it hides the branch
        yield [n.target for n in ordered], None if last is None else last.target


def conv_norm_pairs(root: nn.Module, graph: fx.Graph) -> Iterator[tuple[str, str]]:
    """(conv, norm) targets in `graph` where the norm's input is the conv's output and nothing else uses it.

    Both modules must be called once in the graph: a shared conv folded for one call would change the others.
    """
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in _norm_nodes(graph.nodes, root):
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and calls[src.target] == calls[node.target] == 1):
            continue
        conv = root.get_submodule(src.target)
        if isinstance(conv, _CONVS) and not conv.transposed:
            yield src.target, node.target
