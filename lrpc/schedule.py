"""Node order of a compiled graph, chosen so that onnxruntime runs the backward late and keeps little alive.

onnxruntime executes a graph in the order of a depth-first walk from its leaves (nodes nobody reads) back to the
inputs, entering at each node the input made by the node of highest index (its position in the file) first and
running a node when all its inputs are done (``GraphViewer``: ``ReverseDFSFrom`` with ``NodeCompare``). On lrpc's
emission order that walk reaches a backward node's stabilizer or denominator (made of forward tensors only, emitted
after the relevance arriving there) before that relevance, so it computes it during the forward and keeps it to the
end, about doubling the activations alive at once.

:func:`order_for_runtime` gives the nodes a new order (still topological) for which that walk enters, at every
node, first the inputs that carry relevance (depend on the seed), then the others, latest-emitted first, which
keeps the emission order's schedule: the planned walk is onnxruntime's walk ranking nodes by (carries relevance,
emission index), and each node's planned entry order becomes a chain of constraints between positions. Nodes
onnxruntime's optimizers create (fused or NCHWc convolutions, layout reorders) get the highest indices and are
entered first, so its walk strays from the plan; wherever it then enters a node, that node's relevance inputs
still come before its other inputs: every node's relevance-carrying inputs are placed after its other inputs
(which lowers the peak further than the planned entry orders alone). Every
constraint agrees with the ranking above (a node that carries relevance is read only by such), so they never form
a cycle; the new order is a topological sort of them, ties in the planned walk's order. The file order is then a
schedule close to the emission order's for runtimes that run nodes in file order. The memory this saves:
docs/performance.md#memory."""
from __future__ import annotations

import heapq

import onnx


def order_for_runtime(graph: onnx.GraphProto, seed: str) -> None:
    """Reorder ``graph.node`` in place as the module docstring says; ``seed``: the tensor the relevance starts
    from."""
    nodes = list(graph.node)
    order = schedule(nodes, seed)
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def schedule(nodes: list, seed: str) -> list[int]:
    """The new order of ``nodes`` (indices into the list, which must be topologically ordered). Linear in the
    number of nodes and edges (times a log for the sort)."""
    reads = [_reads(node) for node in nodes]
    n, ins = len(nodes), _input_nodes(nodes, reads)
    carries = _depends_on(nodes, reads, seed)
    walk, entered = runtime_walk(nodes, lambda k: (carries[k], k), ins)
    after: list[list[int]] = [[] for _ in range(n)]  # after[a]: what is placed after a; ids >= n: barriers
    indegree = [0] * n

    def edge(lo: int, hi: int) -> None:
        after[lo].append(hi)
        indegree[hi] += 1

    for k, made_by in enumerate(ins):
        for j in made_by:
            edge(j, k)
    for popped in entered:  # entered first -> higher index (a chain orders them all)
        for hi, lo in zip(popped, popped[1:]):
            edge(lo, hi)
    for made_by in ins:  # at every node, whatever else has run: its relevance inputs after its other inputs
        other, carrying = [j for j in made_by if not carries[j]], [j for j in made_by if carries[j]]
        if other and carrying:
            barrier = len(after)
            after.append([])
            indegree.append(0)
            for j in other:
                edge(j, barrier)
            for j in carrying:
                edge(barrier, j)
    rank = {k: i for i, k in enumerate(walk)}
    rank.update({b: -1 for b in range(n, len(after))})
    ready = [(rank[k], k) for k in range(len(after)) if indegree[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, k = heapq.heappop(ready)
        if k < n:
            order.append(k)
        for b in after[k]:
            indegree[b] -= 1
            if indegree[b] == 0:
                heapq.heappush(ready, (rank[b], b))
    if len(order) != n:  # every constraint orders by (carries relevance, emission index): never a cycle
        raise RuntimeError("internal error: the node order constraints of the compiled graph form a cycle")
    return order


def runtime_walk(nodes: list, key=None, ins: list | None = None) -> tuple[list[int], list[list[int]]]:
    """onnxruntime's execution order of ``nodes`` (indices), and per entered node (the leaves first) the inputs
    it entered, in the order it entered them. ``key`` (default: the index, as onnxruntime) ranks a node's inputs,
    highest entered first; it must rank every node above the nodes it depends on, as the index does (so must the
    order planned with it: ``(carries relevance, index)`` does, as only relevance-carrying nodes read such)."""
    key = key or (lambda k: k)
    ins = _input_nodes(nodes) if ins is None else ins
    read = [False] * len(nodes)
    for made_by in ins:
        for j in made_by:
            read[j] = True
    leaves = sorted((k for k in range(len(nodes)) if not read[k]), key=key, reverse=True)
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
        popped = sorted((j for j in ins[k] if not seen[j]), key=key, reverse=True)
        entered.append(popped)
        stack.extend((j, False) for j in reversed(popped))
    return order, entered


def _input_nodes(nodes: list, reads: list | None = None) -> list[list[int]]:
    """Per node, the (distinct) nodes making its inputs, outer-scope reads of its subgraphs included."""
    made = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    reads = [_reads(n) for n in nodes] if reads is None else reads
    return [sorted({made[x] for x in names if x in made}) for names in reads]


def _reads(node) -> list[str]:
    names = [x for x in node.input if x]
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in g.node:
                names += _reads(n)
    return names


def _depends_on(nodes: list, reads: list, seed: str) -> list[bool]:
    """Per node, whether it makes the seed or reads something made from it."""
    reached, out = {seed}, []
    for n, names in zip(nodes, reads):
        hit = seed in n.output or any(x in reached for x in names)
        if hit:
            reached.update(x for x in n.output if x)
        out.append(hit)
    return out
