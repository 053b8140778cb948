"""Constrained decoding, strict reply parsing, crops, prompts and request planning (no model)."""

import json
import types

import jsonschema
import pytest
import torch
import xgrammar as xgr
from PIL import Image

from annotate.captioners.prompts import PromptSet
from annotate.captioners.requests import CaptionPlan, CaptionSettings, parse_reply, reply_schema
from annotate.config import load_config
from annotate.engine.records import Detection, Record
from annotate.vlm.bounded_schema import reply_bytes, token_budget
from annotate.vlm.client import ChatReply
from annotate.vlm.crops import crop_box
from annotate.vlm.in_process import Exclusions, SchemaLogitsProcessor, compact_json
from annotate.vlm.replies import REASONS, Unusable, check_caption, script_share
from tests.support.annotate_inputs import REPO

SETTINGS = CaptionSettings(max_caption_chars=40, max_instance_chars=20)


def byte_vocabulary(extra: list[bytes]) -> tuple[xgr.TokenizerInfo, list[bytes]]:
    """The 256 bytes, ``extra`` tokens and an end of sequence (the last id), for xgrammar."""
    vocabulary = [bytes([b]) for b in range(256)] + extra + [b"<|im_end|>"]
    return xgr.TokenizerInfo(vocabulary, stop_token_ids=[len(vocabulary) - 1]), vocabulary


def test_grammar_accepts_exactly_the_schemas_language():
    schema = reply_schema(True, 2, SETTINGS)
    compiler = xgr.GrammarCompiler(byte_vocabulary([])[0])
    grammar = xgr.GrammarMatcher(compact_json(compiler, schema))
    good = '{"caption":"a red ball on grass","instances":[{"caption":"a ball"},{"caption":"é"}]}'
    assert grammar.accept_string(good) and grammar.is_completed()
    for bad in [
        '{"caption":"","instances":[{"caption":"a"},{"caption":"b"}]}',  # minLength 1
        '{"caption":"x","instances":[{"caption":"a"}]}',  # one item short
        '{"caption":"x" ,',  # whitespace is not generated
        '{"caption":"' + "x" * 41,  # over maxLength
        '{"caption":"\xff',  # not UTF-8
    ]:
        grammar.reset()
        assert not (grammar.accept_string(bad.encode("latin-1")) and grammar.is_completed()), bad
    enum = xgr.GrammarMatcher(compact_json(compiler, {"enum": ["yes", "no"]}))
    assert enum.accept_string('"no"') and enum.is_completed()
    enum.reset()
    assert not enum.accept_string('"n"x')
    assert len(good.encode()) <= reply_bytes(schema) < token_budget(schema)


@pytest.mark.parametrize(
    ("schema", "fault"),
    [
        ({"type": "string"}, "need maxLength"),
        ({"type": "array", "items": {"enum": ["a"]}}, "need items and maxItems"),
        ({"type": "integer"}, "not supported"),
        ({"type": "string", "maxLength": 3, "pattern": "a+"}, r"\['pattern'\]"),
        (
            {"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": []},
            "every property must be required",
        ),
    ],
)
def test_unsupported_schemas_are_named(schema, fault):
    with pytest.raises(ValueError, match=fault):
        reply_bytes(schema)


def accepts(matcher: xgr.GrammarMatcher, token: int) -> bool:
    """Whether the matcher takes the token next (left as it was)."""
    if not matcher.accept_token(token):
        return False
    matcher.rollback(1)
    return True


def test_constrained_decoding_walks_only_into_valid_json():
    """The logits processor allows exactly what xgrammar accepts less the exclusions (raw
    control characters, which xgrammar 0.2.8 lets into bounded strings, UTF-16 surrogates,
    added tokens), and greedy choices on random logits always end in JSON that follows the
    schema, multi-byte characters split across tokens."""
    schema = reply_schema(True, 2, SETTINGS)
    info, vocabulary = byte_vocabulary(
        [
            b'{"caption":"',
            b'"}',
            b'"},{"',
            b"red ball",
            "é".encode(),
            "中文".encode()[:4],
            b'a"',
            b'"},{"caption":"x',
            'é"'.encode(),
            b"a\\n",
            b"a\tb",
            b"x\xed\xa0\x80",  # a surrogate: not UTF-8
            b"<|image_pad|>",  # an added token, which xgrammar reads as text
        ]
    )
    eos = len(vocabulary) - 1
    added = types.SimpleNamespace(added_tokens_decoder={eos - 1: None, eos: None})
    exclusions = Exclusions.of(info, added, [eos])
    assert exclusions.always.nonzero().flatten().tolist() == [*range(32), 127, 266, 267, 268]
    grammar = compact_json(xgr.GrammarCompiler(info), schema)
    always, after_lead = exclusions.always.tolist(), exclusions.after_lead.tolist()
    generator = torch.Generator().manual_seed(0)
    for walk in range(30):
        processor = SchemaLogitsProcessor([grammar], [token_budget(schema)], 1, [eos], exclusions)
        follower = xgr.GrammarMatcher(grammar, override_stop_tokens=[eos])
        ids, out = [0], b""
        while True:
            scores = processor(
                torch.tensor([ids]), torch.randn(1, len(vocabulary), generator=generator)
            )
            allowed = torch.isfinite(scores[0])
            if walk < 2:  # exactly xgrammar's tokens less the exclusions (token by token)
                excluded = always.copy()
                if len(ids) > 1 and ids[-1] in exclusions.ends_in_lead:
                    excluded = [a or b for a, b in zip(excluded, after_lead, strict=True)]
                assert allowed.tolist() == [
                    not excluded[token] and accepts(follower, token)
                    for token in range(len(vocabulary))
                ], (walk, out)
            token = int(scores.argmax())
            if token == eos:
                break
            out += vocabulary[token]
            ids.append(token)
            assert follower.accept_token(token)
        jsonschema.validate(json.loads(out.decode("utf-8")), schema)


def reply(value) -> ChatReply:
    text = value if isinstance(value, str) else json.dumps(value)
    return ChatReply(text=text, finish_reason="stop")


def test_replies_are_read_strictly_with_a_reason_each():
    two = {"instances": [{"caption": "a red ball"}, {"caption": "a blue box"}]}
    assert parse_reply(reply(two), False, 2, SETTINGS) == ["a red ball", "a blue box"]
    cases = {
        "unparsable": [
            reply('Here it is: {"instances": []}'),
            reply({"instances": [{"caption": "a"}]}),
            reply({"instances": [{"caption": "a"}, {"caption": "b"}], "extra": 1}),
            reply({"instances": "a, b"}),
        ],
        "refusal": [reply("I'm sorry, but I cannot help with that.")],
        "length": [ChatReply(text='{"instances": [{"capt', finish_reason="length")],
        "timeout": [ChatReply.failed("timeout: no reply within 5s (attempts: 2)")],
    }
    for code, replies in cases.items():
        for case in replies:
            results = parse_reply(case, False, 2, SETTINGS)
            assert [r.code for r in results] == [code, code], case
    mixed = {
        "caption": "a red ball and a box",
        "instances": [{"caption": "x" * 21}, {"caption": "  "}, {"caption": "一个红色的球"}],
    }
    caption, *instances = parse_reply(reply(mixed), True, 3, SETTINGS)
    assert caption == "a red ball and a box"
    assert [r.code for r in instances] == ["too_long", "empty", "wrong_language"]
    assert {r.code for r in instances} <= set(REASONS)


def test_caption_checks():
    assert check_caption("  a  red\nball ", 20, "en") == "a red ball"
    assert check_caption("Grüne Äpfel", 20, "de") == "Grüne Äpfel"
    assert check_caption("一个红色的球", 20, "zh") == "一个红色的球"
    assert check_caption("a red ball", 20, None) == "a red ball"
    assert script_share("ball 球", "en") == pytest.approx(0.8)
    with pytest.raises(Unusable, match="refusal"):
        check_caption("As an AI I cannot see images", 80, "en")
    with pytest.raises(Unusable, match="unparsable: a caption must be a string"):
        check_caption(["a"], 20, "en")
    with pytest.raises(ValueError, match="unknown reason code"):
        Unusable("oops", "not a code")


def test_crop_keeps_context_and_stays_inside():
    image = Image.new("RGB", (200, 100))
    assert crop_box(image, (0.25, 0.25, 0.75, 0.75), 0.0).size == (100, 50)
    assert crop_box(image, (0.25, 0.25, 0.75, 0.75), 0.2).size == (140, 70)
    assert crop_box(image, (0.0, 0.9, 0.1, 1.0), 0.5).size == (30, 15)  # clipped at the edges
    assert crop_box(image, (0.5, 0.5, 0.5001, 0.5001), 0.0).size == (1, 1)


def test_prompt_sets_are_validated_and_filled():
    prompts = PromptSet()
    text = prompts.joint_text(["cup", "table"], 300, 100)
    assert text.startswith("Image 1 is the whole picture.")
    assert (
        "Image 2: a crop centred on a cup." in text
        and "Image 3: a crop centred on a table." in text
    )
    assert "at most 300 characters" in text and "at most 100 characters" in text
    assert "German" in prompts.system_text("de")
    with pytest.raises(ValueError, match="prompt 'crop' has a placeholder it cannot fill"):
        PromptSet(crop="Image {index}: {label}")


def scene_record(index: int, colour: tuple[int, int, int], boxes: list) -> Record:
    image = Image.new("RGB", (64, 48), (230, 230, 230))
    image.paste(colour, (8, 8, 40, 40))
    record = Record(uri=f"scene-{index}", source="test", partition=0, position=index)
    record.pixels, record.pixels_size = image.tobytes(), image.size
    record.instances = [Detection(box, label, 0.9) for box, label in boxes]
    return record


def test_plan_deduplicates_groups_and_assembles():
    box, other = (0.1, 0.1, 0.6, 0.8), (0.5, 0.2, 0.9, 0.9)
    records = [
        scene_record(0, (200, 0, 0), [(box, "ball"), (box, "ball"), (other, "box"), (box, "cup")]),
        scene_record(1, (200, 0, 0), [(box, "ball")]),  # the same image again
        scene_record(2, (0, 0, 200), []),
    ]
    settings = CaptionSettings(instances_per_request=2, max_caption_chars=40)
    plan = CaptionPlan(records, settings)
    # two images, three distinct crops of record 0 (the repeated ball once) in two requests
    assert [len(p.places) for p in plan.planned] == [1, 1, 2, 1]
    assert plan.planned[0].places == [[(0, None), (1, None)]]
    assert plan.planned[2].places == [[(0, 0), (0, 1), (1, 0)], [(0, 2)]]
    assert [len(r.images) for r in plan.requests] == [1, 1, 2, 1]
    replies = [
        reply({"caption": "a red square"}),
        ChatReply.failed("http: 503 busy (attempts: 4)"),
        reply({"instances": [{"caption": "a red ball"}, {"caption": "a box"}]}),
        reply({"instances": [{"caption": "a cup" * 50}]}),
    ]
    first, second, third = plan.captions(replies)
    assert (first.caption, first.instances) == ("a red square", ["a red ball"] * 2 + ["a box", ""])
    assert [(f.instance, f.reason.split(":")[0]) for f in first.faults] == [(3, "too_long")]
    assert (second.caption, second.instances, second.faults) == ("a red square", ["a red ball"], [])
    assert third.caption == "" and third.instances == []
    assert [(f.stage, f.instance, f.reason) for f in third.faults] == [
        ("caption", None, "http: 503 busy (attempts: 4)")
    ]


def test_real_scale_profile_validates(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # hub ids are fine to name; nothing is downloaded
    config = load_config(REPO / "configs" / "sdxl.yaml")
    captioner = config.provenance()["caption"]
    assert captioner["backend"] == "openai_http" and captioner["model"].startswith(
        "Qwen/Qwen2.5-VL"
    )
    assert captioner["api_key_env"] == "VLLM_API_KEY" and captioner["prompts"]["version"]
    assert config.detector.settings.model == "IDEA-Research/grounding-dino-base"
