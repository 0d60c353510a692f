"""rankcut: post-training low-rank (SVD) compression of large language models.

The verbs::

    import rankcut
    model, tok = rankcut.load_model("smollm2")
    report = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.2), calib_ids)
    rankcut.save_pretrained(model, "out", tok)
    model = rankcut.from_pretrained("out")        # or AutoModelForCausalLM after import
    dense = rankcut.to_dense(model)
    rankcut.evaluate(model, eval_ids)

Importing rankcut registers its quantizer with transformers (side effect), so that
``AutoModelForCausalLM.from_pretrained`` rebuilds rankcut checkpoints.
"""

__version__ = "0.1.0"

from .checkpoint import from_pretrained, register_with_transformers, save_pretrained  # noqa: E402
from .errors import RankcutError  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .methods import METHODS, make_config  # noqa: E402
from .models import load_model  # noqa: E402
from .modules import LowRankLinear  # noqa: E402
from .pipeline import compress, to_dense  # noqa: E402

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
    "save_pretrained",
    "to_dense",
]
