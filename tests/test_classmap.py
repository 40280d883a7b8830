"""Class maps: parsing JSON and CSV, every refusal, and a label's map and score from its model classes."""
import numpy as np
import pytest

from weakloc.models import annotate, classmap
from weakloc.models.cam import CamOutputs

NAMES = ["tench, Tinca tinca", "Granny Smith", "orange", "lemon", "wallaby, brush kangaroo", "crane_n02012849",
         "crane_n03126707", "banana"]


def test_json_maps_names_aliases_and_lists():
    cm = classmap.parse_class_map(
        '{"apple": ["Granny_Smith"], "kangaroo": "wallaby", "citrus": ["orange", "lemon"], "raccoon": []}', NAMES)
    assert cm.labels == ("apple", "kangaroo", "citrus", "raccoon")  # file order: the boxes' class ids
    assert cm.members == ((1,), (4,), (2, 3), ())
    assert cm.label_of() == {1: 0, 4: 1, 2: 2, 3: 2}
    assert cm.to_json(NAMES)["labels"]["kangaroo"] == ["wallaby, brush kangaroo"]
    # null is "declared, not boxed", as []; an exact name needs no alias.
    assert classmap.parse_class_map('{"x": null, "y": "wallaby, brush kangaroo"}', NAMES).members == ((), (4,))


def test_csv_rows_accumulate_and_comments_are_skipped():
    text = '# dataset label, model classes\napple,Granny Smith\ncitrus,orange\ncitrus,lemon\n"kangaroo","wallaby, brush kangaroo"\nraccoon\n\n'
    cm = classmap.parse_class_map(text, NAMES, fmt="csv")
    assert cm.labels == ("apple", "citrus", "kangaroo", "raccoon")
    assert cm.members == ((1,), (2, 3), (4,), ())


@pytest.mark.parametrize("text, fmt, match", [
    ('{"apple": ["Golden Delicious"]}', "json", "'Golden Delicious' is not a class of the model"),
    ('{"bird": "crane"}', "json", "could be any of the model classes"),
    ('{"a": "orange", "b": ["lemon", "orange"]}', "json", "mapped from both 'a' and 'b'"),
    ('{"apple": 3}', "json", "must map to a model class name or a list"),
    ('["apple"]', "json", "expected a JSON object"),
    ('{"apple": ', "json", "not valid JSON"),
    ("{}", "json", "maps no dataset label"),
    (",orange\n", "csv", "CSV line 1 has no dataset label"),
    ("# nothing\n", "csv", "maps no dataset label"),
])
def test_each_refusal_is_one_clear_line(text, fmt, match):
    with pytest.raises(classmap.ClassMapError, match=match) as err:
        classmap.parse_class_map(text, NAMES, fmt=fmt)
    assert "\n" not in str(err.value)


def test_labels_without_a_mapping_are_refused():
    cm = classmap.parse_class_map('{"apple": "Granny Smith"}', NAMES)
    classmap.check_labels(["apple"], cm, "--input x")
    with pytest.raises(classmap.ClassMapError, match=r"--input x holds labels \['pear'\] that the class map"):
        classmap.check_labels(["apple", "pear"], cm, "--input x")
    with pytest.raises(classmap.ClassMapError, match="combine must be one of"):
        classmap.ClassMap(("a",), ((1,),), combine="mean")


def _outputs(low, scores, cam_classes, k=1):
    """CamOutputs of one image whose maps are already at the input size (no upsampling)."""
    low = np.asarray(low, np.float32)[None]
    scores = np.asarray(scores, np.float32)[None]
    top = np.argsort(-scores[0])[:k][None].astype(np.int32)
    return CamOutputs(scores, top, scores[0, top[0]][None], np.asarray(cam_classes, np.int32)[None], low,
                      low.shape[2:])


@pytest.mark.parametrize("combine, expected", [("max", [0, 0, 3, 1]), ("sum", [4, 0, 6, 2])])
def test_a_label_of_two_classes_gets_their_combined_map_and_summed_score(combine, expected):
    # The label "citrus" maps to orange (2) and lemon (3). Raw 2x6 maps: orange is hot on the left (4, 3 px)
    # and warm on the right (2, 4 px); lemon is warm on the right only. At tau 0.6 the max map (left 4,
    # right 2 -> normalised 1 and 0.5) keeps the left only: [0, 0, 3, 1]. The sum (left 4, right 4) keeps
    # both, and the right component (4 px) is the largest: [4, 0, 6, 2].
    orange = np.array([[4, 4, 4, 0, 2, 2], [0, 0, 0, 0, 2, 2]], np.float32)
    lemon = np.array([[0, 0, 0, 0, 2, 2], [0, 0, 0, 0, 2, 2]], np.float32)
    top = np.zeros((2, 6), np.float32)
    scores = np.zeros(8, np.float32)
    scores[[2, 3, 0]] = [0.3, 0.2, 0.5]
    cm = classmap.parse_class_map('{"apple": "Granny Smith", "citrus": ["orange", "lemon"]}', NAMES, combine=combine)
    opts = annotate.BoxOptions(classes="labels", default_threshold=0.6, class_map=cm, mode="largest")
    meta = annotate.ImageMeta("i", "i", width=60, height=20, label_ids=[1], label_texts=["citrus"])
    extra = annotate.extra_classes([meta], opts)
    assert extra.tolist() == [[2, 3]]
    out = _outputs([top, orange, lemon], scores, [0, 2, 3])
    (row,) = annotate.annotate_batch(out, [meta], NAMES, opts, "m", extra)
    (box,) = row["boxes"]
    assert (box["class_id"], box["label"]) == (1, "citrus")
    assert box["score"] == pytest.approx(0.5)  # 0.3 + 0.2: the chance of either class
    # Boxes scale from the 2x6 map to the 60x20 image: x10, y10.
    assert [box["xmin"] / 10, box["ymin"] / 10, box["xmax"] / 10, box["ymax"] / 10] == pytest.approx(expected)
    assert row["classes"][0]["label"] == NAMES[0]  # the model's own top-1 keeps the model's name


def _labelled_shard(tmp_path, texts):
    """One TFRecord of 40x40 shapes, each labelled (image and box) with the dataset label texts[i]."""
    from tests.helpers import png_bytes
    from weakloc.models import records, synthetic

    data = synthetic.make_shapes(len(texts), size=40, seed=5)
    shard = tmp_path / "d.tfrecord"
    shard.write_bytes(b"".join(records.frame_record(records.make_example(
        png_bytes(data.images[i]), source_id=f"d{i}", label_texts=[t],
        boxes=[list(np.asarray(data.boxes[i]) / 40)], box_texts=[t])) for i, t in enumerate(texts)))
    return shard


@pytest.mark.slow
def test_label_boxes_dataset_labels_through_the_map_and_evaluate_scores_them(tiny_model_path, tmp_path):
    """label --class_map on the tiny cat/dog/bird model: "pup" = dog + bird, boxed on the sum (the default) of
    their raw CAMs (recomputed here from the model's own maps), "kitty" = cat; evaluate scores the dataset labels, and
    "ferret" (mapped to nothing) is neither boxed nor scored."""
    import json

    from tests.helpers import RUNNER
    from weakloc.models import boxes as boxlib
    from weakloc.models import cam, opening
    from weakloc.pipeline import cli, inputs, results

    texts = ["kitty", "pup", "ferret", "pup", "kitty", "pup"]
    shard = _labelled_shard(tmp_path, texts)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"kitty": "cat", "pup": ["dog", "bird"], "ferret": []}))
    out = tmp_path / "o"
    assert cli.main(["label", "--input", str(shard), "--model", tiny_model_path, "--output", str(out),
                     "--classes", "labels", "--class_map", str(cmap), "--cam_threshold", "0.4",
                     f"--runner={RUNNER}"]) == 0
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    opened = opening.open_model(tiny_model_path)
    model, prep = opened.build(), opened.spec.prep
    examples = list(inputs.iterate(inputs.scan([str(shard)], class_names=("kitty", "pup", "ferret")),
                                   input_size=prep.input_size))
    for ex, text in zip(examples, texts):
        row = rows[ex.image_id]
        assert [(lab["class_id"], lab["label"]) for lab in row["labels"]] == [(("kitty", "pup", "ferret").index(text),
                                                                                text)]
        if text == "ferret":
            assert row["boxes"] == []
            continue
        members = [0] if text == "kitty" else [1, 2]
        o = model(ex.pixels[None], extra=np.array([members], np.int32))
        k = o.top_classes.shape[1]
        normed, valid = boxlib.normalize_cams(cam.upsample(o.low_res[0, k:].sum(axis=0)[None], o.size))
        want = boxlib.scale_boxes(boxlib.boxes_from_cams(normed, 0.4, valid=valid).xyxy, o.size, (40, 40))
        (box,) = row["boxes"]
        assert box["label"] == text and box["score"] == pytest.approx(float(o.scores[0, members].sum()), rel=1e-5)
        np.testing.assert_allclose([box["xmin"], box["ymin"], box["xmax"], box["ymax"]], want[0], atol=1e-4)
    summary = results.read_summary(str(out))
    assert summary["options"]["class_map"]["labels"]["pup"] == ["dog", "bird"]

    assert cli.main(["evaluate", "--annotations", str(out)]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["pairs"] == 5 and set(ev["per_class"]) == {"kitty", "pup"}  # the ferret image is not scored
    assert ev["detection"]["instances"] == 5


@pytest.mark.parametrize("args, doc, texts, match", [
    (["--classes", "predicted"], {"kitty": "cat"}, ["kitty"], "needs --classes labels"),
    ([], {"kitty": "wolf"}, ["kitty"], "'wolf' is not a class of the model"),
    ([], {"kitty": "cat"}, ["kitty", "hamster"], r"labels \['hamster'\] that the class map does not map"),
])
def test_label_refuses_a_bad_class_map_before_any_worker(tiny_model_path, tmp_path, args, doc, texts, match):
    import json

    from tests.helpers import RUNNER
    from weakloc.pipeline import label
    from weakloc.pipeline.options import OptionsError

    shard = _labelled_shard(tmp_path, texts)
    (tmp_path / "map.json").write_text(json.dumps(doc))
    out = tmp_path / "o"
    argv = ["--input", str(shard), "--model", tiny_model_path, "--output", str(out), "--classes", "labels",
            "--class_map", str(tmp_path / "map.json"), *args, f"--runner={RUNNER}"]
    with pytest.raises(OptionsError, match=match) as err:
        label.run(argv)
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())
