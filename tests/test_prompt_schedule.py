"""Prompt editing `[a:b:when]`, alternation `[a|b]`, composable `AND`, `BREAK`: the popular web UI's syntax.

Expected schedules are the web UI's (modules/prompt_parser.py, `get_learned_conditioning_prompt_schedules`): its
doctests and examples, and outputs of that function (lark 1.3.1) recorded for the odd cases. The guidance tests
check the combination against the formula and against today's plain classifier-free guidance, bit for bit.
The `test_pipeline_*` tests run the built-in model through `Pipeline`; they need the prompt-schedule integration
in pipeline.py (`batch_conditioning` and `cfg_denoiser(..., sigmas)` in `Pipeline.sample`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanodiffusion.guidance import cfg_denoiser
from nanodiffusion.prompt_schedule import ScheduledConditioning, batch_conditioning, composable_parts, prompt_schedule
from nanodiffusion.prompts import encode_prompts, weighted_chunks

WEB_UI_DOCTESTS = [   # (prompt, steps, schedule) from the web UI's docstrings
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 4, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 5, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female")]),
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
     "[ in background:0.25] [shoddy:masterful:0.5]", 100, [
         (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
         (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
         (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
         (75, "fantasy landscape with a lake and an oak in background masterful"),
         (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
]

WEB_UI_RECORDED = [   # (prompt, steps, schedule) as the web UI's function returns them
    ("a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),   # its doctest predates optional alternation options
    ("[a:b:0]", 4, [(4, "b")]),
    ("[a:b:0.0]", 4, [(4, "b")]),
    ("[a:b:-1]", 4, [(4, "b")]),
    ("[a:b:1.0]", 4, [(4, "a")]),            # a decimal point means a fraction of the steps
    ("[a:b:1]", 4, [(1, "a"), (4, "b")]),    # no decimal point: a step number
    ("[a:b:2.]", 4, [(4, "a")]),
    ("[a:b:1e1]", 4, [(4, "a")]),
    ("[a:b:+2]", 4, [(2, "a"), (4, "b")]),
    ("[a:b:00.5]", 4, [(2, "a"), (4, "b")]),
    ("[a:b: 3 ]", 4, [(3, "a"), (4, "b")]),
    ("[a:b:3\n]", 4, [(3, "a"), (4, "b")]),
    ("[:3]", 4, [(3, ""), (4, "")]),
    ("[a::3]", 4, [(3, "a"), (4, "")]),
    ("[|]", 2, [(1, ""), (2, "")]),
    ("[a|b|]", 4, [(1, "a"), (2, "b"), (3, ""), (4, "a")]),
    ("x [a|[b:c:3]] y", 4, [(1, "x a y"), (2, "x b y"), (3, "x a y"), (4, "x c y")]),
    ("[[a:b:2]|c]", 4, [(1, "a"), (2, "c"), (3, "b"), (4, "c")]),
    ("[a:[b|c]:2]", 4, [(1, "a"), (2, "a"), (3, "b"), (4, "c")]),
    ("[a:(b):2]", 4, [(2, "a"), (4, "(b)")]),
    ("( [a:b:2] )", 4, [(2, "( a )"), (4, "( b )")]),
    ("<lora:x:0.5> [a:b:2]", 4, [(2, "<lora:x:0.5> a"), (4, "<lora:x:0.5> b")]),
    ("(a:1.2) [b] \\[c\\]", 4, [(4, "(a:1.2) [b] \\[c\\]")]),
    ("[a:b:3] [c", 4, [(3, "a [c"), (4, "b [c")]),
    # text, as the web UI keeps what does not parse
    ("a | b [c:2]", 4, [(4, "a | b [c:2]")]),
    ("[a|b", 4, [(4, "[a|b")]),
    ("[a:b]", 4, [(4, "[a:b]")]),
    ("[a:b:c]", 4, [(4, "[a:b:c]")]),
    ("[a:b:c:3]", 4, [(4, "[a:b:c:3]")]),
    ("[(a|b)]", 4, [(4, "[(a|b)]")]),
    ("x(a:b:2)", 4, [(4, "x(a:b:2)")]),
    ("[a:b:.]", 4, [(4, "[a:b:.]")]),
    ("a\\", 4, [(4, "a\\")]),
    ("a\\\nb [c:2]", 4, [(4, "a\\\nb [c:2]")]),
    # the web UI's parser reads an edit followed by an even run of stray brackets as text
    ("[a:b:2]((x", 4, [(4, "[a:b:2]((x")]),
    ("[a:b:2](x", 4, [(2, "a(x"), (4, "b(x")]),
    ("[a:b:2](((x", 4, [(2, "a(((x"), (4, "b(((x")]),
    ("[a:b:2] ((x", 4, [(2, "a ((x"), (4, "b ((x")]),
    ("[a:b:2]::()x", 4, [(4, "[a:b:2]::()x")]),
    ("[x:y:1]([a:b:2]((", 4, [(4, "[x:y:1]([a:b:2]((")]),
    ("[x:y:1][a:b:2]((", 4, [(1, "x[a:b:2](("), (4, "y[a:b:2]((")]),
    ("[[c:d:3]::2]((", 4, [(4, "[[c:d:3]::2]((")]),
    ("[a:[c:d:3]:2]((", 4, [(3, "[a:c:2](("), (4, "[a:d:2]((")]),
    ("[a|b]((a", 4, [(1, "a((a"), (2, "b((a"), (3, "a((a"), (4, "b((a")]),
]


@pytest.mark.parametrize("prompt, steps, expected", WEB_UI_DOCTESTS + WEB_UI_RECORDED)
def test_schedule_is_the_web_uis(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_pathological_prompts_are_text_not_a_crash():
    for prompt in ["[" * 20_000, "[a:" * 5000, "(a|" * 5000, "[[[[a:b:2]" * 2000, "[a:b:1e999]", "[a:b:-1e999]"]:
        schedule = prompt_schedule(prompt, 20)
        assert schedule[-1][0] == 20
    assert prompt_schedule("[" * 10_000 + "a:b:2" + "]" * 10_000, 4) == [(2, "[" * 9999 + "a" + "]" * 9999),
                                                                       (4, "[" * 9999 + "b" + "]" * 9999)]


def test_a_step_reads_the_first_entry_that_lasts_to_it():
    """The web UI's sampler step i (from 0) uses the first entry whose last step is >= i."""
    schedule = ScheduledConditioning.parse("[a:b:0.5]", 4)
    assert [schedule.at(i) for i in range(4)] == [[("a", 1.0)]] * 3 + [[("b", 1.0)]]
    alternating = ScheduledConditioning.parse("[a|b]", 4)
    assert [alternating.at(i)[0][0] for i in range(4)] == ["a", "a", "b", "a"]


@pytest.mark.parametrize("prompt, parts", [
    ("a cat AND a dog :1.2", [("a cat", 1.0), (" a dog", 1.2)]),
    ("a cat:0.5", [("a cat", 0.5)]),
    ("a cat AND a dog:-.5 AND", [("a cat", 1.0), (" a dog", -0.5), ("", 1.0)]),
    ("ANDROID and AND", [("ANDROID and", 1.0), ("", 1.0)]),
    ("(a:1.2) AND [b:c:0.5]", [("(a:1.2)", 1.0), (" [b:c:0.5]", 1.0)]),
    ("x :1.2 y", [("x :1.2 y", 1.0)]),
])
def test_and_splits_into_weighted_parts(prompt, parts):
    assert composable_parts(prompt) == parts


def test_parts_have_their_own_schedules_and_the_negative_no_parts():
    cond = ScheduledConditioning.parse("[a|b] AND c [d:e:1] :2", 2)
    assert cond.at(0) == [("a", 1.0), (" c d", 2.0)] and cond.at(1) == [("a", 1.0), (" c d", 2.0)]
    assert cond.at(2) == [("b", 1.0), (" c e", 2.0)]
    assert cond.values() == ["a", "b", " c d", " c e"]
    assert ScheduledConditioning.parse("x AND y :2", 2, composable=False).at(0) == [("x AND y :2", 1.0)]


class Words:
    """A tokenizer with chunks of 4 tokens: one id per word, 10 + the place of its first letter in the alphabet."""

    model_max_length, bos_token_id, eos_token_id, pad_token_id = 6, 1, 2, 0

    def encode(self, text: str) -> list[int]:
        return [10 + ord(word[0].lower()) - ord("a") for word in text.split()]


def ids(text: str) -> list[list[int]]:
    return [chunk for chunk, _ in weighted_chunks(Words(), text)]


def test_break_ends_a_chunk():
    a, b, c, d, e = (10 + k for k in range(5))
    assert ids("a b BREAK c") == [[a, b], [c]]
    assert ids("a b c d BREAK e") == [[a, b, c, d], [e]]   # a full chunk is not followed by an empty one
    assert ids("a b c d e") == [[a, b, c, d], [e]]
    assert ids("a BREAK") == [[a]] and ids("a BREAK BREAK b") == [[a], [], [b]] and ids("BREAK a") == [[], [a]]
    assert ids("aBREAK BREAKb") == [[a, b]]   # BREAK only as a word of its own
    assert weighted_chunks(Words(), "(a BREAK b:2)") == [([a], [2.0]), ([b], [2.0])]


def test_break_pads_like_the_end_of_a_prompt_and_all_prompts_get_the_same_chunks():
    rows = []

    def text_encoder(tokens, clip_skip):
        rows.append(tokens.tolist())
        return tokens.float().unsqueeze(-1)

    context = encode_prompts(text_encoder, Words(), ["a BREAK b", "c"])
    assert context.shape == (2, 12, 1)
    assert rows == [[[1, 10, 2, 0, 0, 0], [1, 11, 2, 0, 0, 0]], [[1, 12, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]]]


def fake_network(log: list):
    """x0 = x * (1 + context): each branch's contexts are told apart by the result; logs batch sizes and contexts."""

    def denoiser(x, sigma, context):
        log.append((float(torch.as_tensor(sigma).max()), context[:, 0, 0].tolist()))
        return x * (1 + context[:, :1, :1].reshape(-1, 1))

    return denoiser


def encode_letters(texts: list[str]) -> dict[str, torch.Tensor]:
    """A [n, 1, 1] context per text: a number the text names (its letters' positions, summed)."""
    return {"context": torch.tensor([[[float(sum(ord(ch) - 96 for ch in t if ch.isalpha()))]] for t in texts])}


def plain_inputs(cond, uncond, rows):
    return cond, uncond


def old_cfg(denoiser, cond, uncond, scale):
    """Classifier-free guidance as it was before schedules: one batch [uncond, cond]."""

    def guided(x, sigma):
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), sigma, context=torch.cat([uncond, cond])).chunk(2)
        return x0_uncond + scale * (x0_cond - x0_uncond)

    return guided


def test_a_plain_prompt_guides_bit_for_bit_as_before():
    torch.manual_seed(0)
    x, cond, uncond = torch.randn(3, 1), torch.randn(3, 1, 1), torch.randn(3, 1, 1)
    denoiser = fake_network([])
    expected = old_cfg(denoiser, cond, uncond, 7.3)(x, 1.3)
    assert torch.equal(cfg_denoiser(denoiser, {"context": cond}, {"context": uncond}, 7.3)(x, 1.3), expected)
    scheduled = ScheduledConditioning([([(4, {"context": cond})], 1.0)])
    negative = ScheduledConditioning([([(4, {"context": uncond})], 1.0)])
    sigmas = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])
    assert torch.equal(cfg_denoiser(denoiser, scheduled, negative, 7.3, sigmas=sigmas)(x, 1.3), expected)


def test_a_plain_prompt_through_batch_conditioning_is_the_plain_guidance():
    log = []
    cond, uncond = batch_conditioning(encode_letters, plain_inputs, ["cab"] * 2, ["b"] * 2, 4)
    x, sigmas = torch.tensor([[1.0], [2.0]]), torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    plain = cfg_denoiser(fake_network(log), {"context": torch.full((2, 1, 1), 6.0)},
                         {"context": torch.full((2, 1, 1), 2.0)}, 5.0)(x, 2.0)
    assert torch.equal(cfg_denoiser(fake_network(log), cond, uncond, 5.0, sigmas=sigmas)(x, 2.0), plain)
    assert log[0] == log[1] == (2.0, [2.0, 2.0, 6.0, 6.0])


def test_and_parts_are_weighted_directions_in_one_batch():
    log = []
    cond, uncond = batch_conditioning(encode_letters, plain_inputs, ["a AND b :0.5 AND c:-2"], ["d"], 1)
    x = torch.tensor([[1.0]])
    out = cfg_denoiser(fake_network(log), cond, uncond, 3.0, sigmas=torch.tensor([1.0, 0.0]))(x, 1.0)
    x0 = {name: x * (1 + value) for name, value in dict(u=4, a=1, b=2, c=3).items()}
    expected = x0["u"] + 3.0 * (x0["a"] - x0["u"]) + 1.5 * (x0["b"] - x0["u"]) - 6.0 * (x0["c"] - x0["u"])
    assert torch.allclose(out, expected) and log == [(1.0, [4.0, 1.0, 2.0, 3.0])]


def test_one_part_weight_times_scale_one_skips_the_unconditional_branch():
    log = []
    cond, uncond = batch_conditioning(encode_letters, plain_inputs, ["b :0.5"], ["d"], 1)
    out = cfg_denoiser(fake_network(log), cond, uncond, 2.0, sigmas=torch.tensor([1.0, 0.0]))(torch.ones(1, 1), 1.0)
    assert torch.equal(out, torch.full((1, 1), 3.0)) and log == [(1.0, [2.0])]


def test_each_call_reads_the_step_its_sigma_falls_in():
    """Step i covers sigmas[i] >= sigma > sigmas[i + 1]: a midpoint evaluation belongs to the step it is taken in."""
    log = []
    cond, uncond = batch_conditioning(encode_letters, plain_inputs, ["[a|b|c|d]"], [""], 4)
    guided = cfg_denoiser(fake_network(log), cond, uncond, 2.0, sigmas=torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))
    for sigma in [4.0, 3.5, 3.0, 2.5, 2.0, 1.0, 0.5, 0.1, torch.tensor([3.0])]:
        guided(torch.ones(1, 1), sigma)
    # steps 0, 0, 1, 1, 2, 3, 3, 3, 1 read a, a, a, a, b, c, c, c, a: as in the web UI, step i reads the first entry
    # lasting to i, [(1, a), (2, b), (3, c), (4, d)], so steps 0 and 1 both read a
    assert [contexts[-1] for _, contexts in log] == [1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 1.0]


def test_rows_with_different_prompts_keep_their_own_parts_and_weights():
    log = []
    cond, uncond = batch_conditioning(encode_letters, plain_inputs, ["a", "b AND c :2"], ["", "d"], 1)
    x = torch.tensor([[1.0], [1.0]])
    out = cfg_denoiser(fake_network(log), cond, uncond, 3.0, sigmas=torch.tensor([1.0, 0.0]))(x, 1.0)
    row0 = 1 + 3.0 * (2 - 1)                               # x0 = 1 + context: uncond 0, a = 1
    row1 = 5 + 3.0 * (3 - 5) + 6.0 * (4 - 5)               # uncond d = 4, b = 2, c = 3
    assert torch.allclose(out, torch.tensor([[row0], [row1]]))
    assert log == [(1.0, [0.0, 4.0, 1.0, 2.0, 1.0, 3.0])]   # row 0 repeats its only part with weight 0


def test_a_schedule_needs_the_sigmas():
    cond, uncond = batch_conditioning(encode_letters, plain_inputs, ["a"], [""], 1)
    with pytest.raises(ValueError, match="sigmas"):
        cfg_denoiser(fake_network([]), cond, uncond, 7.0)


# The built-in model through Pipeline: these need pipeline.py's integration of batch_conditioning.

@pytest.fixture(scope="module")
def pipe():
    from nanodiffusion.pipeline import Pipeline

    return Pipeline.load()


def image(pipe, prompt, **settings) -> np.ndarray:
    settings = dict(steps=3, seed=7, sampler="euler", cfg=6.0) | settings
    return np.stack([np.asarray(im) for im in pipe(prompt, **settings)])


def test_pipeline_edit_at_0_is_the_second_prompt_and_at_the_end_the_first(pipe):
    red, blue = image(pipe, "a red circle"), image(pipe, "a blue square")
    assert not np.array_equal(red, blue)
    assert np.array_equal(image(pipe, "[a red circle:a blue square:0]"), blue)
    for when in ("1.0", "3", "7"):
        assert np.array_equal(image(pipe, f"[a red circle:a blue square:{when}]"), red)


def test_pipeline_edit_midway_and_alternation_are_neither_prompt(pipe):
    """5 steps: the web UI's alternation uses red, red, blue, red, blue (step i takes the first entry ending at or
    after i), so the last step is blue's; with 4 it would end on red, and a model that settles colour early could
    round to red's exact pixels."""
    red, blue = image(pipe, "red circle", steps=5), image(pipe, "blue circle", steps=5)
    for prompt in ("[red:blue:0.5] circle", "[red|blue] circle"):
        mixed = image(pipe, prompt, steps=5)
        assert not np.array_equal(mixed, red) and not np.array_equal(mixed, blue)
    assert np.array_equal(image(pipe, "[red|red] circle", steps=5), red)
    assert np.array_equal(image(pipe, "[red:red:0.5] circle", steps=5), red)
    assert np.array_equal(image(pipe, "[red|red] circle", steps=4, sampler="heun"),
                          image(pipe, "red circle", steps=4, sampler="heun"))


def test_pipeline_and_weights(pipe):
    red = image(pipe, "a red circle")
    assert np.array_equal(image(pipe, "a red circle :1"), red)
    assert np.array_equal(image(pipe, "a red circle :2", cfg=3.0), red)   # weight 2 at cfg 3: cfg 6
    both = image(pipe, "a red circle AND a blue square :0.8")
    assert not np.array_equal(both, red) and not np.array_equal(both, image(pipe, "a blue square"))


def test_pipeline_runs_every_and_part_in_one_network_batch(pipe, monkeypatch):
    batches = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: batches.append(len(x)) or forward(x, *a, **k))
    image(pipe, "a red circle AND a blue square :0.8 AND [circle|square]", batch=2, steps=2)
    assert batches == [8, 8]


def test_pipeline_break_and_negative_schedules(pipe):
    red = image(pipe, "a red circle", negative_prompt="blue")
    assert np.array_equal(image(pipe, "a red circle BREAK", negative_prompt="blue"), red)
    assert not np.array_equal(image(pipe, "a red BREAK circle", negative_prompt="blue"), red)
    assert np.array_equal(image(pipe, "a red circle", negative_prompt="[square:blue:0]"), red)


def test_pipeline_batch_rows_keep_their_own_prompts(pipe):
    rows = image(pipe, ["[a red circle:a blue square:0]", "a red circle AND a blue square"], seed=3)
    alone = image(pipe, "a blue square", seed=3)
    assert np.abs(rows[0].astype(int) - alone[0].astype(int)).max() <= 2   # another batch size: rounding only


def test_pipeline_png_text_keeps_the_prompt_as_typed(pipe):
    prompt = "[red:blue:0.5] circle BREAK square AND a square :0.8"
    assert pipe(prompt, steps=2, seed=0)[0].info["parameters"].split("\n")[0] == prompt


def test_warnings_read_every_text_of_the_schedule_not_its_syntax():
    from nanodiffusion.models.word_tokenizer import WordTokenizer
    from nanodiffusion.prompts import prompt_warnings

    words = WordTokenizer.build(["a red blue circle square"], model_max_length=6)
    assert prompt_warnings(words, "[red:blue:0.5] circle BREAK a red circle AND a [circle|square] :0.8") == []
    assert prompt_warnings(words, "[red:zebra:0.5] circle AND [a|yak]") == [
        "words this model does not know are ignored: zebra, yak"]
    assert prompt_warnings(words, "[a red:a:3] circle [a|red square]") == [
        "prompt is 5 tokens, longer than the 4 the model reads at once: encoded in 2 chunks"]
