"""Before/after view of a surgered model, for code review: the module tree, the runtime changes and
the computation graph — as a structural diff, as code and as a picture.

* :mod:`surgery.diff.snapshot` — what is recorded of a model (tree, exported graph with provenance);
* :mod:`surgery.diff.graph` — matching the two graphs node by node, and the code rendering;
* :mod:`surgery.diff.picture` — the data-flow pictures (inline SVG);
* :mod:`surgery.diff.core` — :class:`Diff`: the tree classification and the text, JSON and HTML views.
"""

from surgery.diff.core import Diff, OpDelta
from surgery.diff.graph import UnitDiff
from surgery.diff.snapshot import (
                                   GraphNode,
                                   GraphSnapshot,
                                   ModuleInfo,
                                   ParamInfo,
                                   Ref,
                                   TreeSnapshot,
                                   _module_path,
                                   capture_graph,
                                   snapshot_tree,
)

__all__ = ["Diff", "OpDelta", "UnitDiff", "GraphNode", "GraphSnapshot", "ModuleInfo", "ParamInfo", "Ref",
           "TreeSnapshot", "capture_graph", "snapshot_tree", "_module_path"]
