"""Node order of a compiled graph, chosen so that onnxruntime runs the backward late and keeps little alive.

onnxruntime executes a graph in the order of a depth-first walk from its leaves (nodes nobody reads) back to the
inputs, entering at each node the input made by the node of highest index (its position in the file) first and
running a node when all its inputs are done (``GraphViewer``: ``ReverseDFSFrom`` with ``NodeCompare``). On lrpc's
emission order that walk reaches a backward node's stabilizer or denominator (made of forward tensors only, emitted
after the relevance arriving there) before that relevance, so it computes it during the forward and keeps it to the
end: ResNet-50 epsilon at batch 8 kept 1061 MiB of activations alive instead of 541 (tensor sizes along
onnxruntime's profiled order; the benchmark's peak RSS went 1422 → 1068 MiB with this module).

:func:`order_for_runtime` gives the nodes a new order (still topological) for which that walk enters, at every
node, first the input that carries relevance (depends on the seed), then the others latest-emitted first, which
keeps the emission order's schedule. An input that another input of the same node depends on is planned last
among them (the index forces that: the walk reaches it through the other one), so the planned entry orders never
contradict a data edge. Nodes onnxruntime's optimizers create (fused or NCHWc convolutions, layout reorders) get
the highest indices and are entered first, so its walk strays from the plan; wherever it then enters a node,
that node's relevance inputs still come before its other inputs: every node's relevance-carrying inputs are
placed after its other inputs (measured: ResNet-50 alpha-beta at batch 8 2133 → 1776 MiB against the plan's
constraints alone). All are constraints between positions (a node that carries relevance is never read by one
that does not, so they never form a cycle), and the new order is a topological sort of them, ties in the
planned walk's order: runtimes that run nodes in file order get that schedule too (README, Performance)."""
from __future__ import annotations

import heapq

import onnx

# above this many nodes the ancestor sets (n² bits) are not built and the emission order is kept
MAX_NODES = 20000


def order_for_runtime(graph: onnx.GraphProto, seed: str) -> bool:
    """Reorder ``graph.node`` in place as the module docstring says; ``seed``: the tensor the relevance starts
    from. False (order unchanged) for graphs over :data:`MAX_NODES` nodes."""
    nodes = list(graph.node)
    if len(nodes) > MAX_NODES or len(nodes) < 2:
        return False
    order = schedule(nodes, seed)
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
    return True


def schedule(nodes: list, seed: str) -> list[int]:
    """The new order of ``nodes`` (indices into the list, which must be topologically ordered)."""
    ins = _input_nodes(nodes)
    ancestors = _ancestors(ins)
    carries = _depends_on(nodes, seed)
    walk, entered = runtime_walk(nodes, lambda k: (carries[k], k), ins, ancestors)
    after = [[] for _ in nodes]  # after[a]: nodes placed after a
    indegree = [0] * len(nodes)
    for k, made_by in enumerate(ins):
        for j in made_by:
            after[j].append(k)
            indegree[k] += 1
    for k, made_by in enumerate(ins):  # at every node, whatever else has run: the relevance before the rest
        for lo in (j for j in made_by if not carries[j]):
            for hi in (j for j in made_by if carries[j]):
                after[lo].append(hi)
                indegree[hi] += 1
    for popped in entered:  # entered first -> higher index (never against a data edge: see runtime_walk)
        for i, hi in enumerate(popped):
            for lo in popped[i + 1:]:
                after[lo].append(hi)
                indegree[hi] += 1
    rank = {k: i for i, k in enumerate(walk)}
    ready = [(rank[k], k) for k in range(len(nodes)) if indegree[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(k)
        for b in after[k]:
            indegree[b] -= 1
            if indegree[b] == 0:
                heapq.heappush(ready, (rank[b], b))
    return order if len(order) == len(nodes) else list(range(len(nodes)))


def runtime_walk(nodes: list, key=None, ins: list | None = None,
                 ancestors: list | None = None) -> tuple[list[int], list[list[int]]]:
    """onnxruntime's execution order of ``nodes`` (indices), and per entered node (the leaves first) the inputs
    it entered in the order it entered them. ``key`` (default: the index, as onnxruntime) ranks a node's inputs:
    highest entered first; an input another pending input depends on waits for it (as the index forces)."""
    key = key or (lambda k: k)
    ins = _input_nodes(nodes) if ins is None else ins
    ancestors = _ancestors(ins) if ancestors is None else ancestors
    read = [False] * len(nodes)
    for made_by in ins:
        for j in made_by:
            read[j] = True

    def entry_order(pending: list[int]) -> list[int]:
        pending = sorted(pending, key=key, reverse=True)
        out = []
        while pending:
            i = next(i for i, a in enumerate(pending) if not any((ancestors[b] >> a) & 1 for b in pending))
            out.append(pending.pop(i))
        return out

    leaves = entry_order([k for k in range(len(nodes)) if not read[k]])
    entered, order, seen = [leaves], [], [False] * len(nodes)
    stack = [(k, False) for k in reversed(leaves)]
    while stack:
        k, done = stack.pop()
        if done:
            order.append(k)
            continue
        if seen[k]:
            continue
        seen[k] = True
        stack.append((k, True))
        popped = entry_order([j for j in ins[k] if not seen[j]])
        entered.append(popped)
        stack.extend((j, False) for j in reversed(popped))
    return order, entered


def _input_nodes(nodes: list) -> list[list[int]]:
    """Per node, the (distinct) nodes making its inputs, outer-scope reads of its subgraphs included."""
    made = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    return [sorted({made[x] for x in _reads(n) if x in made}) for n in nodes]


def _reads(node) -> list[str]:
    names = list(node.input)
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in g.node:
                names += _reads(n)
    return names


def _depends_on(nodes: list, seed: str) -> list[bool]:
    """Per node, whether it makes the seed or reads something made from it."""
    reached, out = {seed}, []
    for n in nodes:
        hit = seed in n.output or any(x in reached for x in _reads(n))
        if hit:
            reached.update(n.output)
        out.append(hit)
    return out


def _ancestors(ins: list[list[int]]) -> list[int]:
    """Per node, the set of nodes it depends on, as a bit mask (``ins`` in topological order)."""
    anc = [0] * len(ins)
    for k, made_by in enumerate(ins):
        for j in made_by:
            anc[k] |= anc[j] | (1 << j)
    return anc
