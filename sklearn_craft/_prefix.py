"""Forward passes that start from kept values of a ``torch.fx`` graph instead of the images.

A sequential :class:`~sklearn_craft.pruner.CraftPruner` fit runs three passes over the task's
images per stage (BatchNorm re-estimation, pooling, compensation), each on a network that differs
from the one before only from the stage's first layer on. :class:`GraphPrefix` keeps, for every
batch, the values that the graph's nodes from one node on (its *cut*) read, so that these passes
run only the part of the network after it. The kept values serve only a network whose graph
before the cut, and the tensors of the modules and attributes it reads there, equal those they
were computed with; any other pass starts from the images. A pass from kept values computes what
a pass from the images computes, bit for bit: the same nodes run, in the same order, on the same
values.
"""

import functools

import torch
from torch import fx
from tqdm.auto import tqdm

from .images import as_image_dataset, iter_batches
from .inspection import _input_dtype

#: Most bytes of values a :class:`GraphPrefix` keeps (a pass whose values take more keeps none).
_PREFIX_BYTES = 1 << 30


class GraphPrefix:
    """The values every batch of a data set gives the nodes of a graph from one node on.

    The arguments are those of :func:`~sklearn_craft.images.iter_batches`. :meth:`forwards`
    runs a network on every batch, from the kept values where they serve it, and may keep the
    values before a later node on the way (they replace the old ones once the pass has seen every
    batch, if they take at most :data:`_PREFIX_BYTES`). :meth:`values` hands the kept values
    to a pass that runs the graph node by node itself.
    """

    def __init__(self, dataset, batch_size, device, preprocess, num_workers):
        self.pass_args = (dataset, batch_size, device, preprocess, num_workers)
        self.cut, self.stored, self.state = None, None, None

    def values(self, model, modules=()):
        """``(position, envs)``: the kept values as ``model``'s nodes, or None where they cannot serve.

        They serve a ``GraphModule`` with the graph and the tensors they were computed with
        before the cut, whose nodes from the cut on read only kept values, when every module of
        ``modules`` (those the caller's pass watches or changes) is called after the cut.
        ``envs`` yields, per batch, a dict node -> value: copies, which the caller may change in
        place, and the attributes the nodes after the cut read.
        """
        position = self._position(model, modules)
        if position is None:
            return None
        nodes = list(model.graph.nodes)
        by_name, later = {node.name: node for node in nodes}, set(nodes[position:])
        attributes = {
            node: _attribute(model, node.target)
            for node in nodes[:position]
            if node.op == "get_attr" and any(user in later for user in node.users)
        }
        envs = ({**attributes, **{by_name[name]: _clone(value) for name, value in env.items()}} for env in self.stored)
        return position, envs

    def forwards(self, model, modules=(), keep=None, progress=False, desc=None):
        """Per batch, ``(n_images, run)``: ``run()`` runs ``model`` on the batch, its hooks firing as usual.

        From the kept values where :meth:`values` serves ``model`` and ``modules`` (the modules
        the caller's hooks watch), else from the images. ``keep``: the name of a node before
        which this pass keeps its values for the next passes (a ``GraphModule`` with one input,
        the node before every module of ``modules``, where a hook may stop the pass).
        ``progress`` shows a progress bar labelled ``desc``, counting batches.
        """
        graph = isinstance(model, fx.GraphModule)
        nodes = list(model.graph.nodes) if graph else []
        keep_at = None
        if keep is not None and graph and [node.op for node in nodes].count("placeholder") == 1:
            keep_at = next((k for k, node in enumerate(nodes) if node.name == keep), None)
            if keep_at is not None and any(k < keep_at for k in _module_positions(model, nodes, modules)):
                keep_at = None
        resumed = self.values(model, modules)
        if resumed is not None and keep_at is not None and keep_at <= resumed[0]:
            keep_at = None
        if resumed is None and keep_at is None:
            for batch in _images(model, self.pass_args, progress, desc):
                yield len(batch), functools.partial(model, batch)
            return
        runner = _Runner(model, nodes)
        if resumed is not None:
            start, envs = resumed[0], tqdm(resumed[1], desc=desc, disable=not progress, total=len(self.stored))
        else:
            start, envs = runner.first, runner.from_images(self.pass_args, progress, desc)
        kept = [] if keep_at is not None else None
        blocks = _Blocks(len(as_image_dataset(self.pass_args[0])), _PREFIX_BYTES) if kept is not None else None

        def run(env):
            nonlocal kept, blocks
            if kept is None:
                runner.run(env, start, len(nodes))
                return
            runner.run(env, start, keep_at)
            values = {node.name: value for node, value in env.items() if node.op != "get_attr"}
            values = blocks.keep(values, runner.batch_size(env))
            if values is None:
                kept, blocks = None, None
            else:
                kept.append(values)
            runner.run(env, keep_at, len(nodes))

        for env in envs:
            yield runner.batch_size(env), functools.partial(run, env)
        if kept is not None:
            self.cut, self.stored = nodes[keep_at].name, kept
            self.state = _state_before(model, nodes, keep_at, copy=True)

    def _position(self, model, modules):
        """Position of the cut in ``model``'s graph where the kept values serve it, else None."""
        if not self.stored or not isinstance(model, fx.GraphModule):
            return None
        nodes = list(model.graph.nodes)
        position = next((k for k, node in enumerate(nodes) if node.name == self.cut), None)
        if position is None or any(k < position for k in _module_positions(model, nodes, modules)):
            return None
        before = {node.name: node.op for node in nodes[:position]}
        reads = {arg.name for node in nodes[position:] for arg in node.all_input_nodes if arg.name in before}
        if any(before[name] != "get_attr" and name not in self.stored[0] for name in reads):
            return None
        if not _same_state(self.state, _state_before(model, nodes, position, copy=False)):
            return None
        return position


class _Blocks:
    """The values a pass keeps of every batch, copied into one block per value for all the images.

    A tensor with the batch's images along its first dimension is copied into a block allocated
    on the first batch for ``n_images`` images, and kept as a view of it; other values are kept as
    copies. One allocation per value and pass, instead of one per batch, goes back to the system
    whole when it is freed: copies made batch by batch, between the temporaries of the forward
    passes, fragmented the heap (a streaming ``CraftPruner`` fit on 200,000 images reached 3.8 GB
    of resident memory with 1 GiB kept). They may take ``budget`` bytes with the ``held`` bytes
    held beside them; values whose first batch, scaled to all the images, would exceed it are not
    kept at all.
    """

    def __init__(self, n_images, budget, held=0):
        self.n_images, self.budget, self.held = n_images, budget, held
        self.blocks, self.filled, self.nbytes = None, 0, 0

    def keep(self, values, n_batch):
        """``values`` (a dict), its tensors copied into the blocks (or cloned); None over the budget."""
        if self.blocks is None:
            if self.held * n_batch + _batch_bytes(values) * self.n_images > self.budget * n_batch:
                return None
            self.blocks = {
                key: value.new_empty((self.n_images, *value.shape[1:]))
                for key, value in values.items()
                if torch.is_tensor(value) and value.ndim > 0 and len(value) == n_batch
            }
            self.nbytes = sum(_nbytes(block) for block in self.blocks.values())
        kept, stop = {}, self.filled + n_batch
        for key, value in values.items():
            block = self.blocks.get(key)
            if (
                block is not None and stop <= self.n_images and torch.is_tensor(value) and value.ndim > 0
                and len(value) == n_batch and value.shape[1:] == block.shape[1:] and value.dtype == block.dtype
            ):
                kept[key] = block[self.filled : stop].copy_(value)
            else:
                kept[key] = _clone(value)
                self.nbytes += _nbytes(kept[key]) if torch.is_tensor(value) else 0
        self.filled = stop
        return kept if self.held + self.nbytes <= self.budget else None


def _nbytes(tensor):
    return tensor.element_size() * tensor.nelement()


def _batch_bytes(values):
    """Bytes of the tensors among the values of the dict ``values``."""
    return sum(_nbytes(value) for value in values.values() if torch.is_tensor(value))


class _Runner:
    """Runs the nodes of a graph on one batch's values, dropping those no later node reads."""

    def __init__(self, model, nodes):
        self.model, self.nodes = model, nodes
        index = {node: k for k, node in enumerate(nodes)}
        self.last_use = {node: max((index[user] for user in node.users), default=-1) for node in nodes}
        self.placeholder = next((node for node in nodes if node.op == "placeholder"), None)
        self.first = index.get(self.placeholder, -1) + 1
        self.interpreter = fx.Interpreter(model)

    def from_images(self, pass_args, progress=False, desc=None):
        """Every batch of images as the value of the graph's input."""
        for batch in _images(self.model, pass_args, progress, desc):
            yield {self.placeholder: batch}

    @staticmethod
    def batch_size(env):
        return len(next(value for node, value in env.items() if node.op != "get_attr" and torch.is_tensor(value)))

    def run(self, env, start, stop):
        """Run the nodes ``start`` to ``stop - 1`` on one batch's values ``env`` (changed in place)."""
        self.interpreter.env = env
        for k in range(start, stop):
            node = self.nodes[k]
            env[node] = self.interpreter.run_node(node)
            for done in [value for value in env if self.last_use[value] <= k]:
                del env[done]


def _images(model, pass_args, progress=False, desc=None):
    """Every batch of images, in the dtype of ``model``'s parameters."""
    dataset, batch_size, device, preprocess, num_workers = pass_args
    dtype = _input_dtype(model)
    options = dict(device=device, preprocess=preprocess, num_workers=num_workers, progress=progress, desc=desc)
    for batch in iter_batches(dataset, batch_size, **options):
        yield batch.to(dtype)


def _clone(value):
    return value.clone() if torch.is_tensor(value) else value


def _attribute(model, target):
    return functools.reduce(getattr, target.split("."), model)


def _module_positions(model, nodes, modules):
    """Positions of the nodes that call any of ``modules`` (module objects of ``model``)."""
    wanted = {id(module) for module in modules}
    return [
        k for k, node in enumerate(nodes) if node.op == "call_module" and id(model.get_submodule(node.target)) in wanted
    ]


def _state_before(model, nodes, position, copy):
    """What the values at ``position`` depend on: the graph before it and the tensors read there."""
    graph, tensors = [], {}
    for node in nodes[:position]:
        graph.append((node.name, node.op, str(node.target), repr(node.args), repr(node.kwargs)))
        if node.op == "call_module":
            state = model.get_submodule(node.target).state_dict(keep_vars=True)
            tensors.update({f"{node.target}.{key}": value for key, value in state.items()})
        elif node.op == "get_attr":
            tensors[node.target] = _attribute(model, node.target)
    if copy:
        tensors = {key: value.detach().clone() if torch.is_tensor(value) else value for key, value in tensors.items()}
    return graph, tensors


def _same_state(old, new):
    (old_graph, old_tensors), (new_graph, new_tensors) = old, new
    if old_graph != new_graph or old_tensors.keys() != new_tensors.keys():
        return False
    for key, value in old_tensors.items():
        other = new_tensors[key]
        if torch.is_tensor(value) != torch.is_tensor(other):
            return False
        if not torch.is_tensor(value):
            if value != other:
                return False
        elif value.shape != other.shape or value.dtype != other.dtype:
            return False
        elif not torch.equal(value, other.detach().to(value.device)):
            return False
    return True
