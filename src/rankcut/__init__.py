"""rankcut: post-training low-rank (SVD) compression of large language models.

The verbs::

    import rankcut
    model, tok = rankcut.load_model("smollm2")
    report = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.2), calib_ids)
    rankcut.save_pretrained(model, "out", tok)
    model = rankcut.from_pretrained("out")        # or AutoModelForCausalLM after import
    dense = rankcut.to_dense(model)
    rankcut.evaluate(model, eval_ids)
    config, update = rankcut.recipe_configs("best", ratio=0.4)  # then compress(..., update=update)

Importing rankcut registers its quantizer with transformers (side effect), so that
``AutoModelForCausalLM.from_pretrained`` rebuilds rankcut checkpoints.
"""

from ._version import __version__
from .compression.pipeline import compress, to_dense
from .errors import RankcutError
from .io.checkpoint import from_pretrained, register_with_transformers, save_pretrained
from .loading import load_model
from .measure.evaluation import evaluate
from .methods import METHODS, make_config
from .nn.modules import LowRankLinear
from .recipes import recipe_configs

register_with_transformers()

__all__ = [
    "METHODS",
    "LowRankLinear",
    "RankcutError",
    "__version__",
    "compress",
    "evaluate",
    "from_pretrained",
    "load_model",
    "make_config",
    "recipe_configs",
    "save_pretrained",
    "to_dense",
]
