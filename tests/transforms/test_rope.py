"""RoPE rewrites: obligations per kind on two architectures, transformers as the oracle for the
exported rope_parameters, spec errors, rollback, and obligations that fail on wrong rotary modules."""

import copy
import json
import math

import pytest
import torch

from surgery.apply import Edit, apply_plan
from surgery.models import tiny
from surgery.transforms import rope as rope_module
from surgery.transforms.rope import RescaledRope, Rope, build_rope, inverse_frequencies, rope_settings
from surgery.verify import Check, verify
from tests.helpers import logits, plan_for, spec_error

KINDS = {
    "linear": "attn.*: rope(linear, scale=4)",
    "linear_odd": "attn: rope(linear, 3)",  # a scale that is not a power of two: float32 rounding differs
    "ntk": "attn: rope(ntk, scale=4)",
    "ntk_dynamic": "attn: rope(ntk_dynamic, scale=4)",
    "yarn": "attn: rope(yarn, scale=4)",
    "yarn_options": "attn: rope(yarn, scale=2.5, beta_fast=16, beta_slow=2, attention_factor=1.2)",
}
L = 64  # tiny() models' max_position_embeddings
N = 2 * L  # sequence length past the trained context


def tokens(n=N, batch=2, seed=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def from_saved_config(model, rope_parameters):
    """Plain transformers, as `from_pretrained` would build it from a config.json carrying `rope_parameters`."""
    saved = json.loads(model.config.to_json_string())
    saved["rope_parameters"] = rope_parameters
    config = type(model.config).from_dict(saved)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


@pytest.mark.parametrize("arch, kind", [
    *((arch, kind) for arch in ("llama", "qwen2") for kind in ("linear", "ntk", "ntk_dynamic", "yarn")),
    ("qwen2", "linear_odd"), ("llama", "yarn_options")])
def test_obligations_hold(arch, kind):
    model = tiny(arch)
    plan = plan_for(KINDS[kind], model)
    assert [t.path for t in plan.steps[0].targets] == ["model.rotary_emb"]
    report = verify(plan, model)
    assert report.ok, report.text()
    assert len(report.measurements) == 6
    assert all(math.isfinite(m.error) and m.error <= m.tol for m in report.measurements)


def test_obligations_hold_on_gemma():
    model = tiny("gemma")
    for text in (KINDS["ntk_dynamic"], KINDS["yarn"]):
        report = verify(plan_for(text, model), model)
        assert report.ok, report.text()


@pytest.mark.parametrize("kind", ["linear", "ntk", "ntk_dynamic", "yarn_options"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_rope_parameters_reproduce_the_surgered_model(arch, kind):
    model = tiny(arch)
    plan = plan_for(KINDS[kind], model)
    params = Rope().rope_parameters(plan.steps[0].params, model.config)
    original = copy.deepcopy(model)
    apply_plan(plan, model)
    assert isinstance(model.model.rotary_emb, RescaledRope)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}  # config untouched
    ids = tokens(N + 16)
    assert (logits(model, ids) - logits(original, ids)).abs().max() > 1e-3  # the rewrite changes the model
    plain = from_saved_config(model, params)
    for n in (N + 16, L // 2, N):
        if kind == "ntk_dynamic":  # transformers' "dynamic" is stateful: a fresh model per comparison
            plain = from_saved_config(model, params)
        assert (logits(model, ids[:, :n]) - logits(plain, ids[:, :n])).abs().max() <= 1e-4


def test_rope_parameters_per_kind():
    config = tiny("llama").config
    base, dim = rope_settings(config)
    assert (base, dim) == (10000.0, 16)

    def params(text):
        return Rope().rope_parameters(plan_for(text, tiny("llama")).steps[0].params, config)

    assert params(KINDS["linear"]) == {"rope_type": "linear", "rope_theta": base, "factor": 4.0}
    assert params(KINDS["ntk"]) == {"rope_type": "default", "rope_theta": base * 4.0 ** (dim / (dim - 2))}
    assert params(KINDS["ntk_dynamic"]) == {"rope_type": "dynamic", "rope_theta": base, "factor": 4.0}
    assert params(KINDS["yarn_options"]) == {
        "rope_type": "yarn", "rope_theta": base, "factor": 2.5, "original_max_position_embeddings": L,
        "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.2}
    # transformers' "dynamic" takes L from max_position_embeddings, so another L is not expressible there…
    assert params("attn: rope(ntk_dynamic, scale=2, original_max_position=32)") is None
    # …but yarn carries its own L.
    assert params("attn: rope(yarn, scale=2, original_max_position=32)")["original_max_position_embeddings"] == 32


def test_custom_trained_length_verifies():
    model = tiny("qwen2")
    for text in ("attn: rope(ntk_dynamic, scale=2, original_max_position=32)",
                 "attn: rope(yarn, scale=2, original_max_position=32)"):
        report = verify(plan_for(text, model), model)
        assert report.ok, report.text()


def test_dynamic_is_identical_up_to_L_and_stateless():
    model = tiny("llama")
    original = copy.deepcopy(model)
    apply_plan(plan_for(KINDS["ntk_dynamic"], model), model)
    ids = tokens()
    assert torch.equal(logits(model, ids[:, :L]), logits(original, ids[:, :L]))
    rotary, x = model.model.rotary_emb, torch.zeros(1)
    fresh = build_rope(plan_for(KINDS["ntk_dynamic"], original).steps[0].params, original.config)
    for n in (4 * L, L, L + 1, L // 2):  # a long call first must not change a later shorter one
        positions = torch.arange(n)[None]
        assert all(torch.equal(a, b) for a, b in zip(rotary(x, positions), fresh(x, positions)))
    assert torch.equal(rotary(x, torch.arange(L)[None])[0], original.model.rotary_emb(x, torch.arange(L)[None])[0])


def test_frequencies_follow_the_formulas():
    config = tiny("llama").config
    base, dim = rope_settings(config)
    theta = inverse_frequencies(base, dim).double()
    p = plan_for(KINDS["ntk"], tiny("llama")).steps[0].params
    ntk = build_rope(p, config).inv_freq.double()
    assert ntk[0].item() == 1.0
    ratio = ntk / theta  # θ'_i/θ_i = s^(−2i/(d−2)): 1 at i = 0, 1/s at the lowest frequency
    expected = 4.0 ** (-torch.arange(dim // 2, dtype=torch.float64) * 2 / (dim - 2))
    assert ((ratio - expected).abs() / expected).max() < 1e-6
    linear = build_rope(plan_for(KINDS["linear"], tiny("llama")).steps[0].params, config).inv_freq.double()
    assert ((linear * 4 - theta).abs() / theta).max() < 1e-6
    yarn = build_rope(plan_for(KINDS["yarn"], tiny("llama")).steps[0].params, config)
    assert yarn.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("text, message", [
    ("attn: rope(linear, scale=0.5)", "greater than or equal to 1"),
    ("attn: rope(cubic, scale=2)", "kind"),
    ("attn: rope(linear, scale=2, beta_fast=8)", "yarn option(s) beta_fast do not apply to rope(linear"),
    ("attn: rope(yarn, scale=2, beta_fast=1, beta_slow=4)", "beta_fast > beta_slow"),
    ("layers[0].attn: rope(linear, scale=2)", "not a subset"),
])
def test_spec_errors(text, message):
    assert message in str(spec_error(text, tiny("llama")))


def test_no_rotary_anchor_on_gpt2():
    message = str(spec_error("attn: rope(linear, scale=2)", tiny("gpt2")))
    assert "finds no anchor" in message and "no rotary anchor" in message


def test_already_scaled_rope_is_refused():
    model = tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "rope_type 'linear'" in str(spec_error(KINDS["ntk"], model))


def test_rollback_restores_the_rotary_module():
    model = tiny("llama")
    original = model.model.rotary_emb
    edit = Edit(model)
    apply_plan(plan_for(KINDS["yarn"], model), model, edit=edit)
    assert model.model.rotary_emb is not original
    edit.rollback()
    assert model.model.rotary_emb is original
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


# ------------------------------------------------------------------ obligations can fail


def measure(text, wrong_rotary, arch="llama"):
    """Each obligation's error when the step's rotary module is replaced by `wrong_rotary(p, config)`."""
    model = tiny(arch)
    plan = plan_for(text, model)
    step = plan.steps[0]
    surgered = copy.deepcopy(model)
    surgered.model.rotary_emb = wrong_rotary(step.params, model.config)
    check = Check(model, surgered, step, seed=0)
    impl = step.spec.instance()
    return {ob.name: getattr(impl, ob.method)(step.params, check) / ob.tol for ob in step.spec.obligations}


def test_obligations_fail_on_a_wrong_linear_scale():
    ratios = measure(KINDS["linear"], lambda p, c: RescaledRope(inverse_frequencies(*rope_settings(c)) / 4.2))
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1
    assert ratios["equals transformers' rope (logits past L)"] > 1
    assert ratios["defining property of the kind (see docstring)"] > 1


def test_obligations_fail_on_ntk_without_the_exponent():
    # b' = b·s (the exponent d/(d−2) forgotten): the lowest frequency is no longer θ_{d/2−1}/s.
    ratios = measure(KINDS["ntk"], lambda p, c: RescaledRope(inverse_frequencies(rope_settings(c)[0] * 4, 16)))
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1
    assert ratios["defining property of the kind (see docstring)"] > 1


def test_obligations_fail_on_dynamic_scaling_within_L():
    class AlwaysScaled(RescaledRope):  # static NTK with α = s at every length, short ones included
        def frequencies(self, position_ids):
            base, dim, s, length = self.dynamic
            return inverse_frequencies(base * s ** (dim / (dim - 2)), dim)

    def wrong(p, c):
        base, dim = rope_settings(c)
        return AlwaysScaled(inverse_frequencies(base, dim), dynamic=(base, dim, p.scale, L))

    ratios = measure(KINDS["ntk_dynamic"], wrong, arch="qwen2")
    assert ratios["defining property of the kind (see docstring)"] > 1
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1


def test_obligations_fail_on_a_stateful_dynamic_rope():
    class Stateful(RescaledRope):  # keeps the longest call's frequencies, as transformers' module does
        longest = 0

        def frequencies(self, position_ids):
            self.longest = max(self.longest, int(position_ids.max()) + 1)
            return super().frequencies(torch.tensor([self.longest - 1]))

    def wrong(p, c):
        base, dim = rope_settings(c)
        return Stateful(inverse_frequencies(base, dim), dynamic=(base, dim, p.scale, L))

    ratios = measure(KINDS["ntk_dynamic"], wrong)
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1


def test_obligations_fail_on_yarn_without_temperature():
    def wrong(p, c):
        base, dim = rope_settings(c)
        return RescaledRope(rope_module.yarn_frequencies(base, dim, p.scale, L, p.beta_fast, p.beta_slow))

    ratios = measure(KINDS["yarn"], wrong, arch="qwen2")
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1
    assert ratios["equals transformers' rope (logits past L)"] > 1
    assert ratios["defining property of the kind (see docstring)"] > 1


PADDED = "left-padded batch equals each row alone"
DECODE = "prefill + decode equals the full forward (rel.)"


@pytest.mark.parametrize("kind", ["linear", "ntk", "ntk_dynamic", "yarn"])
def test_padded_obligation_fails_when_position_ids_are_ignored(kind):
    # Numbering the call's own tokens is right for a full forward from position 0, which is all the
    # other obligations feed; a decode step through the KV cache (after a padded prefill, or any) is not.
    class CallColumns(RescaledRope):
        def forward(self, x, position_ids):
            columns = torch.arange(position_ids.shape[-1], device=position_ids.device)
            return super().forward(x, columns.expand_as(position_ids))

    def wrong(p, c):
        right = build_rope(p, c)
        return CallColumns(right.inv_freq, right.attention_scaling, right.dynamic)

    ratios = measure(KINDS[kind], wrong)
    assert {name for name, ratio in ratios.items() if ratio > 1} == {PADDED, DECODE}
    assert ratios[PADDED] > 10 and ratios[DECODE] > 10


def test_dynamic_past_L_follows_the_batch_longest_row_as_transformers_does():
    """The choice documented for ntk_dynamic: past L a short row takes its batch's frequencies."""
    model = tiny("llama")
    plan = plan_for(KINDS["ntk_dynamic"], model)
    plain = from_saved_config(model, Rope().rope_parameters(plan.steps[0].params, model.config))
    apply_plan(plan, model)
    ids, short = tokens(N), 20
    mask = torch.ones_like(ids)
    mask[1, : N - short] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=ids * mask, attention_mask=mask, position_ids=positions).logits
        theirs = plain(input_ids=ids * mask, attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=ids[1:, N - short:]).logits
    assert (ours[1, N - short:] - theirs[1, N - short:]).abs().max() <= 1e-5
    assert (ours[1, N - short:] - alone[0]).abs().max() > 1e-3  # not the row alone, by design


def test_identity_obligation_fails_when_scale_one_is_not_plain(monkeypatch):
    real = rope_module.build_rope
    monkeypatch.setattr(rope_module, "build_rope",
                        lambda p, c: RescaledRope(real(p, c).inv_freq / (p.scale + 0.5)))
    for kind in ("linear", "ntk", "yarn"):
        assert measure(KINDS[kind], real)["scale=1 is the identity (cos/sin)"] > 1


# ------------------------------------------------------- yarn_dynamic, llama3, longrope (issue 7)

LONG = "[" + ", ".join(f"{1 + i / 4:g}" for i in range(8)) + "]"    # 8 pairs: tiny models' rotary dim 16
SHORT = "[" + ", ".join(f"{1 + i / 40:g}" for i in range(8)) + "]"
NEW_KINDS = {
    "yarn_dynamic": "attn: rope(yarn_dynamic, scale=2)",
    "yarn_dynamic_options": "attn: rope(yarn_dynamic, 3, beta_fast=16, attention_factor=1.1)",
    "llama3": "attn: rope(llama3, scale=8)",
    "llama3_bands": "attn: rope(llama3, 4, low_freq_factor=2, high_freq_factor=16, original_max_position=32)",
    "longrope": f"attn: rope(longrope, scale=4, long_factor={LONG})",
    "longrope_options": f"attn: rope(longrope, 2, short_factor={SHORT}, long_factor={LONG}, attention_factor=1.3)",
}


@pytest.mark.parametrize("kind", list(NEW_KINDS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_new_kinds_obligations_hold(arch, kind):
    model = tiny(arch)
    report = verify(plan_for(NEW_KINDS[kind], model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 6  # with "left-padded batch equals each row alone" and "prefill + decode …"


def transformers_config(model, rope_parameters):
    config = copy.deepcopy(model.config)
    config.rope_parameters = rope_parameters
    return config


@pytest.mark.parametrize("kind", ["llama3", "llama3_bands", "longrope", "longrope_options"])
def test_frequencies_equal_transformers_rope_functions(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = tiny("llama")
    p = plan_for(NEW_KINDS[kind], model).steps[0].params
    params = Rope().rope_parameters(p, model.config)
    assert params["rope_type"] == kind.split("_")[0]
    ours = build_rope(p, model.config)
    init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    config = transformers_config(model, params)
    length = p.original_max_position or L
    theirs, factor = init(config, None)  # the short (≤ L) set for longrope
    assert torch.equal(ours.inv_freq, theirs) and ours.attention_scaling == factor
    if kind.startswith("longrope"):
        long, _ = init(config, None, seq_len=length + 1)
        assert torch.equal(ours.frequencies(torch.arange(length + 1)[None]), long)
        assert torch.equal(ours.frequencies(torch.arange(length)[None]), theirs)
        assert not torch.equal(long, theirs)
    else:  # the band is really blended for these settings: some pairs kept, some divided, some between
        plain = inverse_frequencies(*rope_settings(model.config))
        ratio = plain / ours.inv_freq
        assert torch.isclose(ratio, torch.tensor(p.scale)).any() and ((ratio > 1.01) & (ratio < p.scale - 0.01)).any()
        assert (ratio == 1).any() == (kind == "llama3")  # L/high_freq_factor = 2 keeps no pair in llama3_bands


def test_yarn_dynamic_is_static_yarn_at_the_call_length_and_plain_within_L():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = tiny("qwen2")
    original = copy.deepcopy(model)
    p = plan_for(NEW_KINDS["yarn_dynamic"], model).steps[0].params
    assert Rope().rope_parameters(p, model.config) is None  # transformers cannot express it
    apply_plan(plan_for(NEW_KINDS["yarn_dynamic"], model), model)
    ids = tokens()
    assert torch.equal(logits(model, ids[:, :L]), logits(original, ids[:, :L]))
    assert (logits(model, ids) - logits(original, ids)).abs().max() > 1e-3
    rotary, x = model.model.rotary_emb, torch.zeros(1)
    for n in (4 * L, L, 2 * L, L // 2, L + 1):  # long before short: nothing is kept between calls
        positions = torch.arange(n)[None]
        s_n = max(1.0, 2 * n / L - 1)
        if s_n == 1:
            expected = original.model.rotary_emb(x, positions)
        else:
            yarn = {**original.config.rope_parameters, "rope_type": "yarn", "factor": s_n,
                    "original_max_position_embeddings": L}
            theirs, factor = ROPE_INIT_FUNCTIONS["yarn"](transformers_config(original, yarn), None)
            angles = positions[..., None].float() * theirs
            emb = torch.cat((angles, angles), -1)
            expected = (emb.cos() * factor, emb.sin() * factor)
            assert factor == pytest.approx(0.1 * math.log(s_n) + 1)
        got = rotary(x, positions)
        assert max((a - b).abs().max().item() for a, b in zip(got, expected)) <= 1e-6, n


@pytest.mark.parametrize("kind", ["llama3", "longrope_options"])
def test_saved_rope_parameters_reproduce_the_new_kinds(kind):
    model = tiny("llama")
    plan = plan_for(NEW_KINDS[kind], model)
    params = Rope().rope_parameters(plan.steps[0].params, model.config)
    original = copy.deepcopy(model)
    apply_plan(plan, model)
    ids = tokens(N + 16)
    assert (logits(model, ids) - logits(original, ids)).abs().max() > 1e-3
    for n in (N + 16, L // 2, L, N):
        plain = from_saved_config(model, params)
        assert (logits(model, ids[:, :n]) - logits(plain, ids[:, :n])).abs().max() <= 1e-4


@pytest.mark.parametrize("text, message", [
    ("attn: rope(longrope, scale=2)", "needs long_factor"),
    ("attn: rope(longrope, scale=2, long_factor=[1.0, 2.0])", "long_factor has 2 entries"),
    (f"attn: rope(longrope, scale=2, long_factor={LONG}, short_factor=[1.0])", "short_factor has 1 entries"),
    ("attn: rope(longrope, scale=2, long_factor=[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])", "must be > 0"),
    ("attn: rope(llama3, scale=8, low_freq_factor=4, high_freq_factor=2)", "low_freq_factor < high_freq_factor"),
    ("attn: rope(yarn, scale=2, low_freq_factor=2)", "llama3 option(s) low_freq_factor do not apply to rope(yarn"),
    (f"attn: rope(ntk, scale=2, long_factor={LONG})", "longrope option(s) long_factor do not apply"),
    ("attn: rope(llama3, scale=2, attention_factor=1.2)", "attention_factor do not apply to rope(llama3"),
])
def test_new_kinds_spec_errors(text, message):
    assert message in str(spec_error(text, tiny("llama")))


def test_obligations_fail_on_llama3_without_the_blend(monkeypatch):
    def wrong(p, c):  # the middle band divided by s like the low frequencies
        base, dim = rope_settings(c)
        theta = inverse_frequencies(base, dim)
        return RescaledRope(torch.where(2 * math.pi / theta >= L / p.high_freq_factor, theta / p.scale, theta))

    ratios = measure(NEW_KINDS["llama3"], wrong)
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1
    assert ratios["equals transformers' rope (logits past L)"] > 1
    assert ratios["defining property of the kind (see docstring)"] > 1


def test_obligations_fail_on_longrope_with_one_factor_set():
    def wrong(p, c):  # the long factors at every length, short calls included
        base, dim = rope_settings(c)
        long = rope_module.longrope_frequencies(base, dim, p.long_factor)
        return rope_module.LongRope(long, long, L, rope_module.longrope_attention_factor(p, L))

    ratios = measure(NEW_KINDS["longrope_options"], wrong, arch="qwen2")
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1
    assert ratios["equals transformers' rope (logits past L)"] > 1
    assert ratios["defining property of the kind (see docstring)"] > 1


def test_obligations_fail_on_yarn_dynamic_scaled_within_L_or_without_temperature():
    class AlwaysScaled(rope_module.DynamicYarnRope):  # s_n never drops to 1: short calls are changed too
        def scale_at(self, position_ids):
            return torch.clamp(super().scale_at(position_ids), min=1.5)

    def scaled(p, c):
        base, dim = rope_settings(c)
        return AlwaysScaled(base, dim, p.scale, L, p.beta_fast, p.beta_slow, p.attention_factor)

    ratios = measure(NEW_KINDS["yarn_dynamic"], scaled)
    assert ratios["defining property of the kind (see docstring)"] > 1
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1

    def cold(p, c):  # no temperature at all
        base, dim = rope_settings(c)
        return rope_module.DynamicYarnRope(base, dim, p.scale, L, p.beta_fast, p.beta_slow, 1.0)

    ratios = measure(NEW_KINDS["yarn_dynamic"], cold, arch="qwen2")
    assert ratios["equals transformers' rope (cos/sin to 4L)"] > 1
    assert ratios["equals transformers' rope (logits past L)"] > 1


def test_identity_obligation_fails_for_new_kinds_when_scale_one_is_not_plain(monkeypatch):
    real = rope_module.build_rope
    monkeypatch.setattr(rope_module, "build_rope",
                        lambda p, c: RescaledRope(real(p, c).frequencies(torch.arange(4 * L)[None]) / (p.scale + 0.5)))
    for kind in ("yarn_dynamic", "llama3", "longrope"):
        assert measure(NEW_KINDS[kind], real)["scale=1 is the identity (cos/sin)"] > 1


@pytest.mark.slow
def test_new_kinds_verify_on_smollm2(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    for text in ("attn.*: rope(yarn_dynamic, scale=2)", "attn.*: rope(llama3, scale=4)"):
        report = verify(plan_for(text, model), model)
        assert report.ok, report.text()


# ---------------------------------------------------------------------------------- ntk_consistent

CONSISTENT = "attn: rope(ntk_consistent, scale=4)"


def _decode(model, ids, prefill):
    """Logits of `ids` from a prefill of `prefill` tokens, then one token per call through the cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits.float()]
        for t in range(prefill, ids.shape[1]):
            out.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits.float())
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_consistent_obligations_hold(arch):
    model = tiny(arch)
    report = verify(plan_for(CONSISTENT, model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 6


def test_transformers_dynamic_drifts_when_decoding_and_consistent_does_not():
    """Prefill within L, then decode past it: transformers' "dynamic" keeps each cached key in the
    base of the step that computed it, so decoding drifts from the full forward; ntk_consistent
    re-rotates every key with the base of the query's length and equals it at every step."""
    ids = tokens(N + 8, batch=1, seed=3)
    theirs = tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    assert theirs.config.rope_parameters["rope_type"] == "dynamic"
    full = logits(theirs, ids)
    assert (_decode(theirs, ids, prefill=L // 2) - full).abs().max() > 1e-3
    ours = tiny("llama")
    apply_plan(plan_for(CONSISTENT, ours), ours)
    full = logits(ours, ids)
    assert (_decode(ours, ids, prefill=L // 2) - full).abs().max() < 1e-5
    # causal consistency: the first t outputs do not depend on later tokens, past L too
    assert (logits(ours, ids[:, :L + 5]) - full[:, :L + 5]).abs().max() < 1e-5
    # within L it is the untouched model; past L it is not (the base grows)
    plain = tiny("llama")
    assert (full[:, :L] - logits(plain, ids)[:, :L]).abs().max() < 1e-5
    assert (full[:, L + 4:] - logits(plain, ids)[:, L + 4:]).abs().max() > 1e-3


def test_consistent_last_query_sees_transformers_dynamic_base():
    """Query N − 1 of an N-token forward uses transformers' dynamic base for N (one layer, so the
    keys' inputs are the same in both)."""
    ours = tiny("llama", num_hidden_layers=1)
    theirs = copy.deepcopy(ours)
    theirs.config.rope_parameters = {**theirs.config.rope_parameters, "rope_type": "dynamic", "factor": 4.0}
    theirs.model.rotary_emb = type(theirs.model.rotary_emb)(theirs.config)
    apply_plan(plan_for(CONSISTENT, ours), ours)
    for n in (L + 1, N + 3):
        ids = tokens(n, batch=1, seed=n)
        assert (logits(ours, ids)[:, -1] - logits(theirs, ids)[:, -1]).abs().max() < 1e-5


def test_consistent_obligation_fails_when_keys_keep_their_own_base(monkeypatch):
    """Mutation: the frame rotates each key with the base of its own length (as a cache of rotated
    keys would hold them): decoding still equals the full forward, but the last query no longer
    sees one base (transformers' dynamic for the call's length), so the decode obligation fails."""
    from surgery.attention import fast

    real = fast.consistent_scores

    def own_base(rotary, q, k, q_pos, k_pos):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)               # k comes one per KV head
        theta_k = rotary.frequencies_at(k_pos + 1).float()                       # [B, n, D/2]
        theta_q = rotary.frequencies_at(q_pos + 1).float()
        qa = torch.cat([q_pos[..., None].float() * theta_q] * 2, -1)[:, None]
        ka = torch.cat([k_pos[..., None].float() * theta_k] * 2, -1)[:, None]
        from surgery.attention.frame import rotate
        return rotate(q, qa.cos(), qa.sin()) @ rotate(k, ka.cos(), ka.sin()).transpose(-1, -2)

    assert real is not own_base
    monkeypatch.setattr(fast, "consistent_scores", own_base)
    model = tiny("llama")
    errors = {m.obligation: m.error for m in verify(plan_for(CONSISTENT, model), model).measurements}
    assert errors["prefill + decode equals the full forward (rel.)"] > 1e-5  # its tolerance


@pytest.mark.parametrize("dim", [16, 64])
def test_consistent_base_is_the_same_alone_and_in_a_batch(dim):
    """θ(n) of a decoding step (n alone) equals, to the bit, θ(n) among a prefill's lengths: at
    distance d a score turns one ulp of θ into d ulps of angle (1e-4 of a score at 16k), and the
    float32 power took a vector or a scalar path by where n sat in the tensor."""
    from surgery.transforms.rope import ConsistentNtkRope

    rotary = ConsistentNtkRope(10000.0, dim, 2.0, 8192)
    n = torch.arange(2 * 8192 - 36, 2 * 8192 + 1)[None]                      # the last 37 lengths of 2L
    batch = rotary.frequencies_at(n)
    alone = torch.cat([rotary.frequencies_at(n[:, i:i + 1]) for i in range(n.shape[1])], dim=1)
    assert torch.equal(batch, alone)
    exact = 1.0 / (10000.0 * (2.0 * n.double() / 8192 - 1) ** (dim / (dim - 2)))[..., None] ** (
        torch.arange(0, dim, 2).double() / dim)
    assert ((batch.double() - exact).abs() / exact).max() < 1e-6


def test_consistent_clashes_with_a_window_and_is_not_exported():
    from surgery.errors import SpecErrors

    with pytest.raises(SpecErrors, match="both set the attention frame"):
        plan_for("attn: rope(ntk_consistent, scale=2) + window(16, sinks=4)", tiny("llama"))
    with pytest.raises(SpecErrors, match="both set the attention cache"):
        plan_for("attn: rope(ntk_consistent, scale=2) + window(16)", tiny("llama"))
    model = tiny("llama")
    p = plan_for(CONSISTENT, model).steps[0].params
    assert Rope().rope_parameters(p, model.config) is None
    plan_for("attn: rope(ntk_dynamic, scale=2) + window(16, sinks=4)", tiny("llama"))  # other kinds add no stage


@pytest.mark.slow
def test_consistent_verifies_on_smollm2(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    report = verify(plan_for("attn.*: rope(ntk_consistent, scale=2)", model), model)
    assert report.ok, report.text()
