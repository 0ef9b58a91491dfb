"""surgery — a declarative model-surgery compiler for Hugging Face models.

    import surgery
    result = surgery.compile(model, "attn.*: lora(r=16); mlp.down: lora(r=16) | ia3")
    result.report.ok, result.plan, result.diff().text()
    result.save("out/")              # surgery.load("out/") rebuilds it bit-exactly
"""

from surgery.api import Result, compile, load, parse, plan
from surgery.errors import ApplyError, ModelError, ObligationError, SaveError, SpecError, SurgeryError

__all__ = [
    "compile", "parse", "plan", "load", "Result",
    "SurgeryError", "SpecError", "ModelError", "ApplyError", "ObligationError", "SaveError",
]
