"""object_masks=segmentation (sag.segmentation, analysis.segmentation_masks): object masks of a capture run's samples
from a local transformers segmentation model folder. The models are tiny random ones built in code under
torch.manual_seed(0) and saved with save_pretrained (a Mask2Former with a tiny Swin backbone: the universal/instance
path; a SegFormer: the semantic path); the run is a debug=tiny capture of tiny_pixel (no domain)."""

import json
import sys

import numpy as np
import pytest
import torch
from cli_helpers import cli
from hydra.core.global_hydra import GlobalHydra

from analysis.driver import run_studies
from analysis.images import load_images, to_uint8
from analysis.masks_source import ObjectMasks
from analysis.segmentation_masks import MASKS_DIR, PROVENANCE
from analysis.studies import Settings
from analysis.tables import read_table
from experiments import capture
from sag.errors import SagConfigError
from sag.probe import SAMPLE_MASKS_FILE

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = [0, 1, 2]
SETTINGS = Settings(psis=[1.0], sources=["final"], random_draws=3, n_boot=20, progress=False)  # small and fast
LABELS = {0: "cat", 1: "dog", 2: "car"}
SEMANTIC = {0: "background", 1: "dog", 2: "car", 3: "never"}  # "never": its logit bias is -1e4 (never arg-max)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A capture of tiny_pixel (debug=tiny): 3 seeds x 2 steps."""
    out = tmp_path_factory.mktemp("seg") / "run"
    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, ["capture", "debug=tiny", "seeds=0-2", "batch_size=3", "steps=2",
                                f"hydra.run.dir={out}"]
    try:
        capture.main()
    finally:
        sys.argv = argv
    return out


@pytest.fixture(scope="module")
def mask2former(tmp_path_factory):
    """A tiny random Mask2Former (Swin backbone, 5 queries, 3 classes) and its PIL image processor, saved."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    folder = tmp_path_factory.mktemp("m2f") / "tiny_m2f"
    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                               num_queries=5, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=16,
                               dim_feedforward=16, num_attention_heads=2, common_stride=4, num_labels=3,
                               id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    """A tiny random SegFormer (semantic) with a background class and a class that is never the arg-max."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

    folder = tmp_path_factory.mktemp("segformer") / "tiny_segformer"
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, num_labels=4, id2label=SEMANTIC,
                             label2id={v: k for k, v in SEMANTIC.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SegformerForSemanticSegmentation(config)
    with torch.no_grad():
        model.decode_head.classifier.bias[3] = -1e4
    model.save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detr(tmp_path_factory):
    """A tiny random DETR panoptic model (DetrForSegmentation, ResNet backbone built in code, no timm); the
    biases make the random queries confident "dog" segments (the processor keeps score x mask prob >= 0.5)."""
    from transformers import DetrConfig, DetrForSegmentation, DetrImageProcessorPil, ResNetConfig

    folder = tmp_path_factory.mktemp("detr") / "tiny_detr"
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                        d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
                        encoder_attention_heads=8, decoder_attention_heads=8, num_queries=5, num_labels=3,
                        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})  # mask head: 32 + 8 heads % 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DetrForSegmentation(config)
    with torch.no_grad():
        model.detr.class_labels_classifier.bias[-1] = -1e4
        model.detr.class_labels_classifier.bias[1] = 5.0  # "dog" scores ~0.99: score x mask prob > mask_threshold
        model.mask_head.output_conv.bias.fill_(3.0)  # mask probs ~0.95
    model.save_pretrained(folder)
    DetrImageProcessorPil(size={"height": 32, "width": 32}, format="coco_panoptic").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def oneformer(tmp_path_factory):
    """A tiny random OneFormer (Swin backbone, tiny text encoder) with its processor: the tests' tiny CLIP tokenizer
    and a local class-info json (repo_path = the folder, so nothing is downloaded)."""
    from transformers import (
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessorPil,
        OneFormerProcessor,
        SwinConfig,
    )

    from sag.models.tiny_sd_pipeline import build_tokenizer

    folder = tmp_path_factory.mktemp("oneformer") / "tiny_oneformer"
    folder.mkdir()
    (folder / "class_info.json").write_text(json.dumps({str(k): {"name": v, "isthing": 1} for k, v in LABELS.items()}))
    tokenizer = build_tokenizer(folder.parent)
    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = OneFormerConfig(backbone_config=backbone, num_queries=5, conv_dim=32, mask_dim=32, hidden_dim=32,
                             encoder_feedforward_dim=16, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                             dim_feedforward=16, text_encoder_width=32, text_encoder_num_layers=1,
                             text_encoder_vocab_size=len(tokenizer), text_encoder_context_length=16, task_seq_len=16,
                             text_encoder_n_ctx=4, num_labels=3, id2label=LABELS,
                             label2id={v: k for k, v in LABELS.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        OneFormerForUniversalSegmentation(config).save_pretrained(folder)
    images = OneFormerImageProcessorPil(size={"height": 32, "width": 32}, num_text=4, num_labels=3,
                                        class_info_file="class_info.json", repo_path=str(folder))
    OneFormerProcessor(image_processor=images, tokenizer=tokenizer, max_seq_length=16,
                       task_seq_length=16).save_pretrained(folder)
    return folder


def direct_masks(folder, run_dir, **post) -> tuple[np.ndarray, list]:
    """The processor's own post-processing of the samples, computed here without sag: (n, 32, 32) union masks of
    every instance segment, and the raw results."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForUniversalSegmentation.from_pretrained(folder).eval()
    pixels = to_uint8(load_images(run_dir, SEEDS)[1])
    with torch.no_grad():
        outputs = model(**processor(images=list(pixels), return_tensors="pt"))
    results = processor.post_process_instance_segmentation(outputs, target_sizes=[(32, 32)] * len(SEEDS), **post)
    masks = [np.isin(r["segmentation"].numpy(), [s["id"] for s in r["segments_info"]]) for r in results]
    return np.stack(masks), results


def test_instance_masks_end_to_end_with_provenance_and_reuse(run, mask2former, monkeypatch):
    source = ObjectMasks.parse("segmentation", segmentation={"model": str(mask2former), "threshold": 0.1})
    label = "segmentation:tiny_m2f:instance:all@0.1"
    assert source.label == label and source.segmentation.family == "universal"
    result = run_studies(run, SETTINGS, studies=["correlation"], modes=["samples"], object_masks=source)
    corr, stats = result.tables["object_correlation"], result.tables["stats"]
    assert set(corr["object_masks"]) == {label} and set(stats["object_masks"]) == {label}
    expected, results = direct_masks(mask2former, run, threshold=0.1)
    assert 0 < expected.sum() < expected.size  # the random model's segments above 0.1 cover part of the images
    stored = np.load(run / SAMPLE_MASKS_FILE)
    assert np.array_equal(stored["object_mask"], expected) and str(stored["source"]) == label  # exact: same calls
    provenance = json.loads((run / MASKS_DIR / PROVENANCE).read_text())
    assert provenance["settings"]["threshold"] == 0.1 and sorted(provenance["images"]) == ["0", "1", "2"]
    # a rerun with the same settings reuses the files (the model is not even loaded) ...
    monkeypatch.setattr("analysis.segmentation_masks.Segmenter", None)
    assert np.array_equal(source.load(SEEDS, (32, 32), run), expected)
    # ... and a class filter is a new setting: only the kept classes' segments
    monkeypatch.undo()
    dog = ObjectMasks.parse("segmentation", segmentation={"model": mask2former, "threshold": 0.1, "classes": ["dog"]})
    dogs = [np.isin(r["segmentation"].numpy(), [s["id"] for s in r["segments_info"] if s["label_id"] == 1])
            for r in results]
    assert np.array_equal(dog.load(SEEDS, (32, 32), run), np.stack(dogs))
    assert json.loads((run / MASKS_DIR / PROVENANCE).read_text())["settings"]["class_ids"] == [1]


def test_semantic_masks_and_a_filter_that_matches_nothing(run, segformer):
    both = ObjectMasks.parse("segmentation", segmentation={"model": segformer, "threshold": None})
    assert both.segmentation.task == "semantic" and both.segmentation.class_ids == (1, 2, 3)  # all but background
    masks = both.load(SEEDS, (32, 32), run)
    assert masks.shape == (3, 32, 32) and masks.any()
    never = ObjectMasks.parse("segmentation", segmentation={"model": segformer, "threshold": None,
                                                            "classes": ["never"]})
    result = run_studies(run, SETTINGS, studies=["correlation"], modes=["samples"], object_masks=never)
    assert not np.load(run / SAMPLE_MASKS_FILE)["object_mask"].any()
    stats = result.tables["stats"]
    auroc = stats[(stats["comparison"] == "auroc_vs_chance") & (stats["target"] == "object")]
    assert len(auroc) and (auroc["n"] == 0).all() and (auroc["n_empty"] == len(SEEDS)).all()  # no object: no pair
    assert set(stats.loc[stats["mode"] == "samples", "object_masks"]) == {"segmentation:tiny_segformer:semantic:3"}


@pytest.mark.parametrize("options, message", [
    ({"model": "/nonexistent/seg"}, r"object_masks_model='/nonexistent/seg': no config.json there; accepted:"),
    ({"classes": ["zebra"]}, r"object_masks_classes: 'zebra' is not a class .* \(0=cat, 1=dog, 2=car\)"),
    ({"classes": [7]}, r"object_masks_classes: 7 is not a class"),
    ({"task": "depth"}, r"object_masks_task='depth'; accepted for Mask2FormerForUniversalSegmentation: auto \| "),
    ({"threshold": 1.5}, r"object_masks_threshold=1.5; accepted: a segment score in \[0, 1\)"),
])
def test_bad_settings_are_refused_in_one_line(mask2former, options, message):
    with pytest.raises(SagConfigError, match=message) as err:
        ObjectMasks.parse("segmentation", segmentation={"model": str(mask2former), **options})
    assert "\n" not in str(err.value)


def test_semantic_and_source_mixups_are_refused(segformer, tmp_path):
    with pytest.raises(SagConfigError, match="semantic task gives no segment scores; accepted: object_masks_thresh"):
        ObjectMasks.parse("segmentation", segmentation={"model": segformer})  # the default 0.5
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"]}))
    with pytest.raises(SagConfigError, match=r"architectures=\['ResNetForImageClassification'\] is no segment"):
        ObjectMasks.parse("segmentation", segmentation={"model": tmp_path})
    with pytest.raises(SagConfigError, match="object_masks_model=.* is read only with object_masks=segmentation"):
        ObjectMasks.parse("embedded", segmentation={"model": segformer})
    with pytest.raises(SagConfigError, match=r"object_masks_classes=\['dog'\] is read only with object_masks=segm"):
        ObjectMasks.parse("files", tmp_path, segmentation={"model": None, "classes": ["dog"], "threshold": 0.5})
    with pytest.raises(SagConfigError, match="object_masks_dir=.* is read only with object_masks=files"):
        ObjectMasks.parse("segmentation", tmp_path, segmentation={"model": segformer})


def test_cli_refuses_before_work_and_runs_with_a_model(run, mask2former, capsys, tmp_path):
    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "config.json").write_bytes((mask2former / "config.json").read_bytes())  # config only: no weights
    code, err, _ = cli(capsys, "studies", "debug=tiny", "studies=[correlation]", "correlation_modes=[samples]",
                       "object_masks=segmentation", f"object_masks_model={broken}", f"hydra.run.dir={tmp_path / 'c'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not load" in err, err
    assert not (tmp_path / "c" / "records").exists()  # refused before the capture
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    args = ["debug=tiny", f"run_dir={run}", "studies=[correlation]", "correlation_modes=[samples]",
            "object_masks=segmentation", "analysis.random_draws=3", "analysis.n_boot=20"]
    code, err, _ = cli(capsys, "studies", *args, f"object_masks_model={mask2former}", "object_masks_classes=[zebra]",
                       f"hydra.run.dir={tmp_path / 'refused'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'zebra' is not a class" in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # a refused run changes nothing
    code, err, out = cli(capsys, "studies", *args, f"object_masks_model={mask2former}",
                         "object_masks_threshold=0.1", f"hydra.run.dir={tmp_path / 'ok'}")
    assert code == 0, err
    corr = read_table(run, "object_correlation")
    assert set(corr["object_masks"]) == {"segmentation:tiny_m2f:instance:all@0.1"}


def test_detr_panoptic_and_oneformer_semantic_match_their_processors(run, detr, oneformer):
    from transformers import AutoModelForUniversalSegmentation, AutoProcessor

    pixels = to_uint8(load_images(run, SEEDS)[1])
    sizes = [(32, 32)] * len(SEEDS)
    source = ObjectMasks.parse("segmentation", segmentation={"model": detr, "task": "panoptic", "threshold": 0.0})
    processor = AutoProcessor.from_pretrained(detr)
    with torch.no_grad():
        outputs = AutoModelForUniversalSegmentation.from_pretrained(detr).eval()(**processor(images=list(pixels),
                                                                                              return_tensors="pt"))
    results = processor.post_process_panoptic_segmentation(outputs, threshold=0.0, target_sizes=sizes)
    expected = np.stack([np.isin(r["segmentation"].numpy(), [s["id"] for s in r["segments_info"]]) for r in results])
    assert expected.any() and np.array_equal(source.load(SEEDS, (32, 32), run), expected)
    with pytest.raises(SagConfigError, match="object_masks_task=instance: OneFormerForUniversalSegmentation's "
                                             "instance post-processing needs torchvision"):
        ObjectMasks.parse("segmentation", segmentation={"model": oneformer})  # auto = instance
    source = ObjectMasks.parse("segmentation", segmentation={"model": oneformer, "task": "semantic",
                                                             "threshold": None, "classes": ["dog", "car"]})
    processor = AutoProcessor.from_pretrained(oneformer)
    inputs = processor(images=list(pixels), task_inputs=["semantic"] * len(SEEDS), return_tensors="pt")
    with torch.no_grad():
        outputs = AutoModelForUniversalSegmentation.from_pretrained(oneformer).eval()(**inputs)
    expected = np.isin(np.stack([r.numpy() for r in processor.post_process_semantic_segmentation(
        outputs, target_sizes=sizes)]), [1, 2])
    assert np.array_equal(source.load(SEEDS, (32, 32), run), expected)
