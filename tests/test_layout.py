"""The layout stage (models/layout.py): box coding, painting, the box flow model, and a Pipeline that uses it."""

from __future__ import annotations

import torch

from nanodiffusion.data.shapes import ShapesDataset, scene_boxes, scene_caption
from nanodiffusion.models.layout import LayoutConfig, LayoutModel, box_overlap, denormalize_boxes, normalize_boxes

TINY = LayoutConfig(context_dim=8, dim=32, heads=2, slot_layers=1, box_layers=2, map_channels=3, sample_steps=16)


def test_box_coding_round_trips_and_marks_absent_slots():
    boxes = torch.tensor([[[1.0, 0.3, 0.7, 0.2], [1.0, 0.9, 0.1, 0.12], [0.0, 0.0, 0.0, 0.0]]])
    v = normalize_boxes(boxes)
    assert v[0, 2].tolist() == [-1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(denormalize_boxes(v), boxes)


def test_scene_boxes_follow_the_prompt_order():
    scene, text = scene_caption(0, "train", 7)
    boxes = scene_boxes(scene)
    assert len(boxes) == 4 and sum(b[0] for b in boxes) == len(scene.objects)
    assert [(b[1], b[2]) for b in boxes[: len(scene.objects)]] == [(o.cx, o.cy) for o in scene.objects]
    assert ShapesDataset(10).boxes(7) == boxes


def test_paint_fills_each_box_with_its_embedded_attributes_and_nothing_elsewhere():
    torch.manual_seed(0)
    model = LayoutModel(TINY)
    slots = torch.randn(1, 4, TINY.dim)
    boxes = torch.tensor([[[1.0, 0.25, 0.25, 0.15], [1.0, 0.75, 0.75, 0.15], [0.0, 0.5, 0.5, 0.3],
                           [0.0, 0.0, 0.0, 0.0]]])
    painted = model.paint(boxes, slots, 16, 16)
    features = model.map_proj(model.attributes(slots))[0]
    torch.testing.assert_close(painted[0, :, 4, 4], features[0], atol=0.02, rtol=0.02)   # centre of box 0 (soft edge)
    torch.testing.assert_close(painted[0, :, 12, 12], features[1], atol=0.02, rtol=0.02)
    assert painted[0, :, 4, 12].abs().max() < 1e-3   # outside both boxes; the absent slot paints nothing
    assert painted[0, :, 8, 8].abs().max() < 1e-3


def test_attributes_are_the_heads_distributions_so_the_map_adds_a_colour_and_a_shape_embedding():
    torch.manual_seed(0)
    model = LayoutModel(TINY)
    slots = torch.randn(2, 4, TINY.dim)
    attributes = model.attributes(slots)
    colours, shapes = attributes.split(TINY.slot_classes, -1)
    torch.testing.assert_close(colours.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(shapes, model.slot_heads[1](slots).softmax(-1))
    colour_part, shape_part = model.map_proj.weight.split(TINY.slot_classes, 1)
    torch.testing.assert_close(model.map_proj(attributes), colours @ colour_part.T + shapes @ shape_part.T
                               + model.map_proj.bias)


def test_box_flow_learns_a_layout_per_text():
    """Two texts, one box layout each: after training, sampling from any noise lands on the right layout."""
    torch.manual_seed(0)
    model = LayoutModel(TINY)
    context = torch.randn(2, 5, TINY.context_dim)
    target = torch.tensor([[[1.0, 0.3, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                           [[1.0, 0.7, 0.2, 0.15], [1.0, 0.3, 0.8, 0.15], [0.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0]]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.flow_loss(target.repeat(16, 1, 1), model.read_slots(context.repeat(16, 1, 1)),
                               context.repeat(16, 1, 1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        sampled = model.sample_boxes(model.read_slots(context), context, torch.randn(2, 4, 4))
    assert sampled[:, :, 0].tolist() == target[:, :, 0].tolist()   # the right slots are present
    present = target[:, :, 0] > 0
    assert (sampled[present][:, 1:] - target[present][:, 1:]).abs().max() < 0.05


def test_pipeline_with_a_layout_stage_generates_and_guides_with_a_blank_map(tmp_path):
    from tests.tiny import tiny_pipeline

    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.pipeline import Pipeline

    pipe = tiny_pipeline()
    torch.manual_seed(1)
    context_dim = pipe.text_encoder.config.hidden_size
    pipe.layout = LayoutModel(LayoutConfig.from_dict({**TINY.__dict__, "context_dim": context_dim})).eval()
    config = UNetConfig.tiny(sample_size=16)
    config.in_channels = 4 + TINY.map_channels
    config.cross_attention_dim = context_dim
    pipe.unet = UNet2DConditionModel(config).eval()
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, context: seen.append(x[:, 4:].clone()) or forward(x, t, context)
    first = pipe("a red circle above a blue square", steps=3, sampler="euler", seed=5, cfg=3.0)[0]
    uncond, cond = seen[0].chunk(2)
    assert uncond.abs().max() == 0 and cond.abs().max() > 0   # CFG's unconditional branch sees no slot map
    again = pipe("a red circle above a blue square", steps=3, sampler="euler", seed=5, cfg=3.0)[0]
    assert first.tobytes() == again.tobytes()
    assert isinstance(pipe, Pipeline)


def test_overlapping_footprints_mix_features_instead_of_adding_them():
    torch.manual_seed(0)
    model = LayoutModel(TINY)
    slots = torch.randn(1, 4, TINY.dim)
    same_place = torch.tensor([[[1.0, 0.5, 0.5, 0.2], [1.0, 0.5, 0.5, 0.2], [0.0, 0.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 0.0]]])
    painted = model.paint(same_place, slots, 16, 16)[0, :, 8, 8]
    features = model.map_proj(model.attributes(slots))[0]
    torch.testing.assert_close(painted, (features[0] + features[1]) / 2, atol=1e-4, rtol=1e-4)


def test_fine_tuning_objective_without_boxes_trains_on_no_slot_map():
    """A user's images without boxes get no map (boxes sampled from the caption contradict the image:
    docs/finetune.md); the diffusion noise stays the target's (regression)."""
    from tests.tiny import tiny_pipeline

    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.train.diffusion import DiffusionObjective

    pipe = tiny_pipeline()
    torch.manual_seed(2)
    context_dim = pipe.text_encoder.config.hidden_size
    layout = LayoutModel(LayoutConfig.from_dict({**TINY.__dict__, "context_dim": context_dim})).eval()
    unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=16, in_channels=4 + TINY.map_channels,
                                                cross_attention_dim=context_dim))
    objective = DiffusionObjective(unet, pipe.text_encoder, pipe.schedule.alphas_cumprod,
                                   pipe.tokenizer([""])[0], layout=layout)
    ids = pipe.tokenizer(["a red circle", "a blue square above a red circle"])
    batch = {"mean": torch.randn(2, 4, 16, 16), "std": torch.full((2, 4, 16, 16), 0.1), "input_ids": ids,
             "scaling_factor": torch.ones(2)}
    loss, logs = objective(batch)
    assert loss.isfinite() and "layout" not in logs
    loss.backward()
    assert unet.conv_in.weight.grad[:, 4:].abs().sum() == 0   # the slot-map channels see zeros
    assert unet.conv_in.weight.grad[:, :4].abs().sum() > 0


def test_box_overlap_counts_present_pairs_closer_than_their_sizes_plus_margin():
    boxes = torch.tensor([[[1.0, 0.3, 0.3, 0.1], [1.0, 0.35, 0.3, 0.1], [1.0, 0.8, 0.8, 0.1], [0.0, 0.3, 0.3, 0.1]]])
    overlap = box_overlap(normalize_boxes(boxes), boxes[..., 0], margin=0.03)
    torch.testing.assert_close(overlap, torch.tensor([0.1 + 0.1 + 0.03 - 0.05]))   # only the first pair; absent: none
    apart = torch.tensor([[[1.0, 0.2, 0.2, 0.1], [1.0, 0.8, 0.2, 0.1], [0.0] * 4, [0.0] * 4]])
    assert box_overlap(normalize_boxes(apart), apart[..., 0]).item() == 0.0   # the training scenes' layouts cost 0


def test_stage_3_separation_gap_costs_nothing_on_the_training_layouts():
    """Stage 3 asks sampled boxes to keep the training scenes' gap: every scene's layout already does."""
    from nanodiffusion.train.layout import SEPARATION_GAP, caption_layouts

    boxes = caption_layouts(0, 300, count=2).flatten(0, 1)
    assert box_overlap(normalize_boxes(boxes), boxes[..., 0], SEPARATION_GAP).max() < 1e-6
    assert box_overlap(normalize_boxes(boxes), boxes[..., 0], SEPARATION_GAP + 0.02).max() > 0   # and no more


def test_separation_term_adds_to_the_flow_loss_only_when_asked():
    torch.manual_seed(0)
    model = LayoutModel(TINY)
    context, slots = torch.randn(4, 5, TINY.context_dim), torch.randn(4, 4, TINY.dim)
    boxes = torch.tensor([[[1.0, 0.25, 0.25, 0.15], [1.0, 0.75, 0.75, 0.15], [0.0] * 4, [0.0] * 4]] * 4)
    torch.manual_seed(1)
    plain = model.flow_loss(boxes, slots, context)
    torch.manual_seed(1)
    separated = model.flow_loss(boxes, slots, context, separation=1.0)
    assert (separated >= plain).all()


def test_controlnet_style_fine_tuning_draws_the_map_from_the_caption():
    """sampled_map: the map generation would paint (boxes sampled from the text), which a layout ControlNet must
    learn to overrule; the slot-map channels take part."""
    from tests.tiny import tiny_pipeline

    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.train.diffusion import DiffusionObjective

    pipe = tiny_pipeline()
    torch.manual_seed(2)
    context_dim = pipe.text_encoder.config.hidden_size
    layout = LayoutModel(LayoutConfig.from_dict({**TINY.__dict__, "context_dim": context_dim})).eval()
    with torch.no_grad():
        layout.box_out.bias[0] = -5.0   # velocity eps - b0 with presence b0 ~ +5: every slot is present
    unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=16, in_channels=4 + TINY.map_channels,
                                                cross_attention_dim=context_dim))
    objective = DiffusionObjective(unet, pipe.text_encoder, pipe.schedule.alphas_cumprod, pipe.tokenizer([""])[0],
                                   uncond_prob=0.0, layout=layout, sampled_map=True)
    batch = {"mean": torch.randn(2, 4, 16, 16), "std": torch.full((2, 4, 16, 16), 0.1),
             "input_ids": pipe.tokenizer(["a red circle", "a blue square"]), "scaling_factor": torch.ones(2)}
    objective(batch)[0].backward()
    assert unet.conv_in.weight.grad[:, 4:].abs().sum() > 0


def layout_pipeline():
    """The tiny pipeline with a random layout stage and a UNet that reads its map."""
    from tests.tiny import tiny_pipeline

    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig

    pipe = tiny_pipeline()
    torch.manual_seed(1)
    context_dim = pipe.text_encoder.config.hidden_size
    pipe.layout = LayoutModel(LayoutConfig.from_dict({**TINY.__dict__, "context_dim": context_dim})).eval()
    pipe.unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=16, in_channels=4 + TINY.map_channels,
                                                     cross_attention_dim=context_dim)).eval()
    return pipe


def test_layout_guidance_is_instructpix2pix_two_condition_guidance():
    """layout_cfg s_L and cfg s_T: x0 = D(u) + s_L (D(map) - D(u)) + s_T (D(map, text) - D(map)), where D(map) reads
    the prompt's slot map beside the negative prompt's text states; layout_cfg = cfg is plain CFG."""
    pipe = layout_pipeline()
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, context: calls.append((x.clone(), context.clone())) or forward(x, t, context)
    kwargs = dict(steps=1, sampler="euler", seed=5, width=64, height=64)
    plain = pipe("a red circle above a blue square", cfg=3.0, **kwargs)[0]
    assert pipe("a red circle above a blue square", cfg=3.0, layout_cfg=3.0, **kwargs)[0].tobytes() == plain.tobytes()
    calls.clear()
    guided = pipe("a red circle above a blue square", cfg=5.0, layout_cfg=2.0, **kwargs)[0]
    (x, context), = calls
    uncond, cond, map_only = x.chunk(3)
    assert torch.equal(cond[:, 4:], map_only[:, 4:]) and uncond[:, 4:].abs().max() == 0
    assert torch.equal(context.chunk(3)[2], context.chunk(3)[0])   # the map-only branch reads the negative's text
    assert guided.tobytes() != plain.tobytes()
    assert "Layout CFG scale: 2" in guided.info["parameters"]


def test_layout_guidance_combines_the_three_branches_as_instructpix2pix():
    """cfg_denoiser over LayoutGuidance = D(u) + s_L (D(map) - D(u)) + s_T (D(map, text) - D(map)) exactly."""
    from nanodiffusion.guidance import LayoutGuidance, as_schedule, cfg_denoiser

    def denoiser(x, sigma, context, layout):   # a nonlinear stand-in for D(x, sigma; text, map)
        return torch.tanh(x * context.mean((1, 2), keepdim=True)[..., None] + layout.sum(1, keepdim=True) * sigma)

    x = torch.randn(2, 4, 8, 8)
    text, negative, slot_map = torch.randn(2, 5, 6), torch.randn(2, 5, 6), torch.randn(2, 3, 8, 8)
    cond, uncond = {"context": text, "layout": slot_map}, {"context": negative, "layout": torch.zeros_like(slot_map)}
    s_text, s_map = 5.0, 2.0
    guided = cfg_denoiser(denoiser, LayoutGuidance(as_schedule(cond), as_schedule(uncond), (s_map - s_text) / s_text),
                          uncond, s_text, sigmas=torch.tensor([1.0, 0.0]))(x, 0.7)
    d_u, d_m, d_f = (denoiser(x, 0.7, **inputs) for inputs in (uncond, {**cond, "context": negative}, cond))
    torch.testing.assert_close(guided, d_u + s_map * (d_m - d_u) + s_text * (d_f - d_m), atol=1e-5, rtol=1e-5)


def test_layout_cfg_on_a_model_without_a_layout_stage_is_one_line():
    import pytest

    from tests.tiny import tiny_pipeline

    from nanodiffusion.errors import NanoDiffusionError

    with pytest.raises(NanoDiffusionError, match="layout_cfg is for a model with a layout stage"):
        tiny_pipeline()("a cat", steps=1, layout_cfg=2.0)


def test_map_only_rows_read_the_map_beside_the_empty_prompt():
    """Stage 2's map_only_prob: captioned rows keep their slot map (from their caption) while the UNet reads the
    empty prompt's text states, so the model learns D(map) for LayoutGuidance."""
    from nanodiffusion.train.diffusion import DiffusionObjective

    pipe = layout_pipeline()
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, context: seen.append((x, context)) or forward(x, t, context)
    objective = DiffusionObjective(pipe.unet, pipe.text_encoder, pipe.schedule.alphas_cumprod,
                                   pipe.tokenizer([""])[0], uncond_prob=0.0, layout=pipe.layout, map_only_prob=1.0)
    ids = pipe.tokenizer(["a red circle", "a blue square above a red circle"])
    boxes = torch.tensor([[[1.0, 0.5, 0.5, 0.2]] + [[0.0] * 4] * 3, [[1.0, 0.5, 0.3, 0.1], [1.0, 0.5, 0.7, 0.1]]
                          + [[0.0] * 4] * 2])
    batch = {"mean": torch.randn(2, 4, 16, 16), "std": torch.full((2, 4, 16, 16), 0.1), "input_ids": ids,
             "scaling_factor": torch.ones(2), "boxes": boxes, "labels": torch.full((2, 4, 2), -1)}
    loss, _ = objective(batch)
    (x, context), = seen
    empty = pipe.text_encoder(pipe.tokenizer([""]))
    assert torch.allclose(context, empty.expand_as(context)) and x[:, 4:].abs().amax((1, 2, 3)).min() > 0
    assert loss.isfinite()


def test_stage_3_redraws_the_slot_reader_and_keeps_the_map_the_unet_reads():
    """Stage 3's objective starts the reader from fresh weights and trains it with the box flow model, while the
    map projection (what the UNet learnt to read) gets no gradient; the heads learn from the labels."""
    from nanodiffusion.train.layout import LayoutStageObjective

    torch.manual_seed(0)
    model = LayoutModel(TINY)
    before = {name: p.clone() for name, p in model.named_parameters()}
    objective = LayoutStageObjective(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    reader = {name for name, _ in model.named_parameters() if name.split(".")[0] in
              ("slot_queries", "slot_blocks", "slot_norm", "slot_heads")}
    assert changed <= reader   # LayerNorms redraw to the same ones and zeros
    assert {"slot_queries", "slot_heads.0.weight", "slot_blocks.0.attn2.to_q.weight"} <= changed
    boxes = torch.tensor([[[1.0, 0.25, 0.25, 0.15], [1.0, 0.75, 0.75, 0.15], [0.0] * 4, [0.0] * 4]] * 4)
    batch = {"boxes": boxes, "context": torch.randn(4, 5, TINY.context_dim),
             "labels": torch.full((4, 4, 2), -1)}
    batch["labels"][:, :2] = torch.tensor([[2, 1], [0, 0]])
    objective(batch)[0].backward()
    assert model.box_out.weight.grad.any()   # the flow model learns (its output layer starts at zero)
    assert all(p.grad is not None and p.grad.any() for p in model.slot_heads.parameters())
    assert model.slot_queries.grad.any()
    assert model.map_proj.weight.grad is None
