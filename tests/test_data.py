"""Tests for data.py: prompts, ids and answer-only labels, image placement, images, datasets, batching, sampling."""
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from data import (BRIEF_DESCRIPTION_QUESTIONS, CLIP_MEAN, CLIP_STD, Collator, ImageError, LLaVADataset,
                  caption_records, encode_conversation, encode_prompt, image_settings, load_image,
                  modality_length_grouped_order, process_image, render_conversation, stop_token_ids)
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
CORPUS = SYSTEM + (" USER: ASSISTANT: What is on the mat? A red cat. Is it sleeping? Yes Describe the image concisely."
                   " Two dogs run on the grass. What color is the ball? Blue. Where is it? Near the left edge.")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama2_tokenizer(style="normalizer", specials=("<unk>", "<s>", "</s>")):
    """A LLaMA-2/Vicuna-style tokenizer.json: sentencepiece BPE over '▁'-prefixed word pieces, with byte fallback.
    style 'normalizer' is Llama-2's own file (Prepend '▁' + Replace ' ' -> '▁'); 'metaspace' prepends with a
    Metaspace pre-tokenizer (prepend_scheme 'always')."""
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    merges = []
    for piece in ["▁"] + sorted(set(CORPUS) - {" "}):
        vocab.setdefault(piece, len(vocab))
    for word in sorted(set(re.findall(r"[A-Za-z]+", CORPUS))):  # '▁word' built one letter at a time
        piece = "▁" + word
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[:end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if style == "normalizer":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return tokenizer


def byte_level_tokenizer(llama3=False):
    """A byte-level BPE trained here: GPT-2 style (the tiny default's kind, specials <s> </s> <unk> <pad>), or Llama-3
    style (its split regex, <|begin_of_text|> and <|end_of_text|>)."""
    tokenizer = Tokenizer(models.BPE())
    if llama3:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<s>", "</s>", "<unk>", "<pad>"]
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS] * 3, trainer)
    return tokenizer


TOKENIZERS = {"llama2": llama2_tokenizer(), "metaspace": llama2_tokenizer("metaspace"),
              "byte_level": byte_level_tokenizer(), "llama3": byte_level_tokenizer(llama3=True)}


def eos_text(tokenizer):
    return "</s>" if tokenizer.token_to_id("</s>") is not None else "<|end_of_text|>"


def conversation(turns, image=True):
    """LLaVA JSON turns from [(question, answer)], the <image> tag in front of the first question."""
    out = []
    for k, (question, answer) in enumerate(turns):
        out.append({"from": "human", "value": ("<image>\n" if image and k == 0 else "") + question})
        if answer is not None:
            out.append({"from": "gpt", "value": answer})
    return out


SINGLE = [("What is on the mat?", "A red cat.")]
MULTI = [("What is on the mat?", "A red cat."), ("Is it sleeping?", "Yes"), ("Where is it?", "Near the left edge.")]


def vicuna_text(turns, image, image_first, eot):
    """The vicuna_v1 prompt written from the facts sheet, independently of data.py."""
    text = SYSTEM + " "
    for k, (question, answer) in enumerate(turns):
        if k == 0 and image:
            question = f"<image>\n{question}" if image_first else f"{question}\n<image>"
        text += f"USER: {question} ASSISTANT:" + ("" if answer is None else f" {answer}{eot}")
    return text


def official_ids(text, tokenizer):
    """LLaVA's tokenizer_image_token: BOS, then the chunks between <image> tags each tokenized as a string of its own
    (special tokens written in the text recognized), joined by the placeholder."""
    bos = tokenizer.token_to_id("<s>")
    ids = [tokenizer.token_to_id("<|begin_of_text|>") if bos is None else bos]
    for k, chunk in enumerate(text.split("<image>")):
        ids += ([IMAGE_TOKEN_INDEX] if k else []) + tokenizer.encode(chunk, add_special_tokens=False).ids
    return ids


def supervised_spans(labels):
    spans, current = [], []
    for label in list(labels) + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans, current = spans + [current], []
    return spans

# ----------------------------------------------------------------------------------------------------------------------
# Prompts, ids, labels


def test_vicuna_prompt_string_and_ids_equal_handwritten_llama2_tokens():
    tokenizer = TOKENIZERS["llama2"]
    turns = conversation([("What is on the mat?", "A red cat."), ("Is it sleeping?", "Yes")])
    expected_text = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                     "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is on the mat?"
                     " ASSISTANT: A red cat.</s>USER: Is it sleeping? ASSISTANT: Yes</s>")
    assert render_conversation(turns, "vicuna_v1", image_first=True) == expected_text
    expected_tokens = ("<s> ▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The "
                       "▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁user ' s ▁questions . "
                       "▁USER : ▁ IMAGE ▁ <0x0A> W h a t ▁is ▁on ▁the ▁mat ? ▁ASSISTANT : ▁A ▁red ▁cat . </s> "
                       "▁USER : ▁Is ▁it ▁sleeping ? ▁ASSISTANT : ▁Yes </s>").split()
    expected_ids = [IMAGE_TOKEN_INDEX if t == "IMAGE" else tokenizer.token_to_id(t) for t in expected_tokens]
    assert None not in expected_ids
    input_ids, labels = encode_conversation(turns, tokenizer, "vicuna_v1", image_first=True)
    assert input_ids == expected_ids
    answers = [tokenizer.token_to_id(t) for t in "▁A ▁red ▁cat . </s> ▁Yes </s>".split()]
    assert [label for label in labels if label != IGNORE_INDEX] == answers


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("turns", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("image", ["first", "after", "none"])
def test_vicuna_ids_equal_official_chunkwise_tokenization_and_labels_are_answers(name, turns, image):
    tokenizer = TOKENIZERS[name]
    eot = eos_text(tokenizer)
    input_ids, labels = encode_conversation(conversation(turns, image != "none"), tokenizer, "vicuna_v1",
                                            image_first=image == "first")
    assert input_ids == official_ids(vicuna_text(turns, image != "none", image == "first", eot), tokenizer)
    assert input_ids.count(IMAGE_TOKEN_INDEX) == (image != "none")
    spans = supervised_spans(labels)
    assert [tokenizer.decode(span, skip_special_tokens=False).removeprefix(" ") for span in spans] == \
        [answer + eot for _, answer in turns]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_plain_template_is_image_then_supervised_caption_and_newline(name):
    tokenizer = TOKENIZERS[name]
    caption = "Two dogs run on the grass."
    for tag in ("<image>\nDescribe the image concisely.", "Describe the image concisely.\n<image>"):
        turns = [{"from": "human", "value": tag}, {"from": "gpt", "value": caption}]
        input_ids, labels = encode_conversation(turns, tokenizer, "plain")
        assert input_ids == official_ids("<image>" + caption + "\n", tokenizer)
        assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] and IGNORE_INDEX not in labels[2:]
        assert tokenizer.decode(labels[2:]).removeprefix(" ") == caption + "\n"
        assert stop_token_ids(tokenizer, "plain")[0] == input_ids[-1]  # the "\n" token ends the caption
        assert encode_prompt(turns[:1], tokenizer, "plain") == input_ids[:2]
    with pytest.raises(ValueError, match="plain template"):
        encode_conversation(conversation(MULTI), tokenizer, "plain")


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("image_first", [True, False])
def test_inference_prompt_is_prefix_stable_and_matches_training_ids(name, image_first):
    tokenizer = TOKENIZERS[name]
    eos = stop_token_ids(tokenizer, "vicuna_v1")
    assert eos == [tokenizer.token_to_id(eos_text(tokenizer))]
    first = encode_prompt(conversation([("What is on the mat?", None)]), tokenizer, image_first=image_first)
    assert first == official_ids(vicuna_text([("What is on the mat?", None)], True, image_first, ""), tokenizer)
    assert tokenizer.decode(first[first.index(IMAGE_TOKEN_INDEX) + 1:]).endswith("ASSISTANT:")
    trained, labels = encode_conversation(conversation(SINGLE), tokenizer, image_first=image_first)
    answer = supervised_spans(labels)[0]  # the answer ids with their EOS
    assert trained == first + answer and answer[-1] == eos[0]
    second = encode_prompt(conversation([SINGLE[0], ("Is it sleeping?", None)]), tokenizer, image_first=image_first)
    assert second[:len(first) + len(answer)] == first + answer
    assert second == official_ids(vicuna_text([SINGLE[0], ("Is it sleeping?", None)], True, image_first,
                                              eos_text(tokenizer)), tokenizer)


def test_tokenizer_without_bos_fails_clearly():
    tokenizer = llama2_tokenizer(specials=("<unk>", "<bos>", "</s>"))
    with pytest.raises(ValueError, match="no BOS token"):
        encode_conversation(conversation(SINGLE), tokenizer)


@pytest.mark.parametrize("bad, message", [
    ([{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}], "unknown role 'bot'"),
    ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello"}], "must alternate"),
    ([{"from": "human", "value": "<image>\nHi <image>"}, {"from": "gpt", "value": "Hello"}], "2 <image> tags"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}], "not in the first human turn"),
    ([{"from": "human", "value": "Hi"}], "last turn must be gpt"),
])
def test_malformed_conversations_are_rejected_with_their_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        encode_conversation(bad, TOKENIZERS["llama2"])


def test_image_first_in_about_half_of_1000_draws_and_reproducible():
    tokenizer = TOKENIZERS["byte_level"]
    turns = conversation(SINGLE)
    first_ids = encode_conversation(turns, tokenizer, image_first=True)[0]
    after_ids = encode_conversation(turns, tokenizer, image_first=False)[0]
    assert first_ids != after_ids

    def draws(seed):
        rng = random.Random(seed)
        out = [encode_conversation(turns, tokenizer, rng=rng)[0] for _ in range(1000)]
        assert all(ids in (first_ids, after_ids) for ids in out)
        return [ids == first_ids for ids in out]
    assert 440 <= sum(draws(0)) <= 560  # 500 +- 3.8 sigma
    assert draws(0) == draws(0) and draws(0) != draws(1)

# ----------------------------------------------------------------------------------------------------------------------
# Images


def random_image(mode, width, height, seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("RGBA", "LA"):  # random transparency
        image = rgb.convert(mode[:-1])
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    if mode == "P":  # 64 random palette colours
        palette = Image.fromarray(rng.integers(0, 64, (height, width), dtype=np.uint8), "P")
        palette.putpalette(rng.integers(0, 256, 64 * 3, dtype=np.uint8).tolist())
        return palette
    return rgb.convert(mode)


def llava_expand2square(image, color):
    """LLaVA-1.5's pad, from the facts sheet: centred on a square of the mean colour."""
    width, height = image.size
    square = Image.new("RGB", (max(width, height),) * 2, color)
    square.paste(image, ((max(width, height) - width) // 2, (max(width, height) - height) // 2))
    return square


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_pixels_equal_clip_image_processor(size, aspect):
    from transformers.image_transforms import convert_to_rgb
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    for mode in ("RGB", "RGBA", "L", "P", "LA"):
        for width, height in [(640, 480), (333, 500), (size, size), (97, 413)]:
            image = random_image(mode, width, height, seed=width)
            reference_input = image
            if aspect == "pad":
                rgb = Image.fromarray(convert_to_rgb(image, return_numpy=True))
                reference_input = llava_expand2square(rgb, tuple(int(m * 255) for m in CLIP_MEAN))
            expected = processor(images=reference_input, return_tensors="pt")["pixel_values"][0]
            ours = process_image(image, size, aspect)
            assert ours.shape == (3, size, size) and ours.dtype == torch.float32
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=f"{mode} {width}x{height}")


def test_cmyk_and_16_bit_images_become_sensible_rgb(tmp_path):
    cmyk = np.zeros((2, 4, 4), dtype=np.uint8)  # white, cyan, magenta, black
    cmyk[0] = [[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255]]
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    expected = [[[255, 255, 255], [0, 255, 255], [255, 0, 255], [0, 0, 0]]]
    assert np.array(load_image(tmp_path / "cmyk.tif"))[:1].tolist() == expected

    grey16 = np.array([[0, 100 * 257, 128 * 257, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert np.array(load_image(tmp_path / "grey16.png")).tolist() == [[[v] * 3 for v in (0, 100, 128, 255)]]


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    loaded = np.array(load_image(tmp_path / "rotated.png"))
    assert loaded.shape == (40, 20, 3)
    assert loaded[5, 10].tolist() == [255, 0, 0] and loaded[35, 10].tolist() == [0, 0, 255]


def write_bad_images(folder):
    """A missing, a zero-byte, a truncated, a non-image and a decompression-bomb image file, by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    random_image("RGB", 64, 64).save(folder / "whole.jpg", quality=95)
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:800])
    Image.new("RGB", (200, 200)).save(folder / "bomb.png")
    return {"missing": "missing.jpg", "zero-byte": "empty.jpg", "truncated": "truncated.jpg",
            "not an image": "text.jpg", "bomb": "bomb.png"}


def test_bad_image_files_raise_image_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # the 200x200 bomb.png is over 2x this: a bomb
    for kind, name in write_bad_images(tmp_path).items():
        with pytest.raises(ImageError, match=re.escape(str(tmp_path / name))):
            load_image(tmp_path / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # over 1x only: Pillow merely warns, we refuse
    with pytest.raises(ImageError, match="DecompressionBomb"):
        load_image(tmp_path / "bomb.png")


def test_image_settings_read_from_vision_and_processor_configs(tmp_path):
    from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    CLIPVisionConfig(image_size=336).save_pretrained(tmp_path / "vision")
    assert image_settings(tmp_path / "vision") == dict(size=336, mean=CLIP_MEAN, std=CLIP_STD)
    CLIPConfig(vision_config=dict(image_size=224)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path / "clip")
    assert image_settings(tmp_path / "clip") == dict(size=224, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    LlavaConfig(vision_config=CLIPVisionConfig(image_size=336), text_config=LlamaConfig()).save_pretrained(
        tmp_path / "llava")
    assert image_settings(tmp_path / "llava")["size"] == 336
    CLIPImageProcessorPil().save_pretrained(tmp_path / "llava")  # crop 224 against a 336 tower
    with pytest.raises(ValueError, match="crop size 224 differs"):
        image_settings(tmp_path / "llava")

# ----------------------------------------------------------------------------------------------------------------------
# Datasets


def record(sample_id, turns, image=None, image_first=True):
    conversations = conversation(turns, image is not None)
    if image is not None and not image_first:
        conversations[0]["value"] = turns[0][0] + "\n<image>"
    return {"id": sample_id, "conversations": conversations, **({"image": image} if image else {})}


def test_llava_558k_150k_and_mix665k_conventions_load(tmp_path):
    paths = ["00453/004539375.jpg", "000000033471.jpg", "coco/train2017/000000033471.jpg", "gqa/images/2354786.jpg",
             "ocr_vqa/images/689852649.jpg", "textvqa/train_images/0a0bc91825468c45.jpg", "vg/VG_100K_2/1.jpg"]
    for k, path in enumerate(paths):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        random_image("RGB", 50 + k, 40, seed=k).save(tmp_path / path)
    records = [record("004539375", [("Render a clear and concise summary of the photo.", "a red cat")], paths[0],
                      image_first=False),
               record("000000033471", MULTI, paths[1])]
    records += [record(f"mix{k}", [("What color is the ball?\nAnswer the question using a single word or phrase.",
                                    "Blue")], path) for k, path in enumerate(paths[2:])]
    records.append({"id": "i6IyJda_0", "model": "", "conversations": conversation(MULTI, image=False)})  # ShareGPT
    (tmp_path / "mix.json").write_text(json.dumps(records))
    dataset = LLaVADataset(str(tmp_path / "mix.json"), tmp_path, TOKENIZERS["llama2"], image_size=224)
    assert len(dataset) == len(records) and dataset.skipped == []
    assert [length > 0 for length in dataset.lengths] == [True] * (len(records) - 1) + [False]
    for k, item in enumerate(dataset):
        assert item["id"] == records[k]["id"]
        assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == ("image" in records[k])
        assert (item["pixel_values"] is None) == ("image" not in records[k])
        if item["pixel_values"] is not None:
            assert item["pixel_values"].shape == (3, 224, 224)
    assert [item["id"] for item in dataset][-1] == "i6IyJda_0"


def test_caption_records_ask_table_8_questions_seeded():
    pairs = [{"id": k, "image": f"{k}.png", "caption": f"caption {k}"} for k in range(200)]
    records = caption_records(pairs, seed=0)
    questions = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in records]
    assert set(questions) == set(BRIEF_DESCRIPTION_QUESTIONS)
    assert [r["conversations"][1]["value"] for r in records] == [p["caption"] for p in pairs]
    assert records == caption_records(pairs, seed=0) and records != caption_records(pairs, seed=1)
    encode_conversation(records[0]["conversations"], TOKENIZERS["llama2"], "plain")


def items_in_workers(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, num_workers=2, collate_fn=list)
    return [item for batch in loader for item in batch]


def test_dataset_placement_is_drawn_from_seed_and_epoch_half_first_and_same_in_workers(tmp_path):
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "a.png")
    tokenizer = TOKENIZERS["byte_level"]
    records = [record(str(k), SINGLE, "a.png") for k in range(1000)]
    first_ids = torch.tensor(encode_conversation(records[0]["conversations"], tokenizer, image_first=True)[0])
    dataset = LLaVADataset(records, tmp_path, tokenizer, image_size=16)

    def placements():
        return [torch.equal(dataset[k]["input_ids"], first_ids) for k in range(len(dataset))]
    epoch0 = placements()
    assert 440 <= sum(epoch0) <= 560 and placements() == epoch0
    dataset.set_epoch(1)
    epoch1 = placements()
    assert epoch1 != epoch0 and 440 <= sum(epoch1) <= 560
    in_workers = items_in_workers(dataset)
    assert [torch.equal(item["input_ids"], first_ids) for item in in_workers] == epoch1
    reseeded = LLaVADataset(records, tmp_path, tokenizer, image_size=16, seed=1)  # epoch 0 again, another seed
    other_seed = [torch.equal(reseeded[k]["input_ids"], first_ids) for k in range(200)]
    assert other_seed != epoch0[:200] and 70 <= sum(other_seed) <= 130


def test_each_bad_input_yields_its_message_and_the_rest_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    bad_images = write_bad_images(tmp_path)
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "good.png")
    good = [record("good-image", MULTI, "good.png"), record("good-text", SINGLE)]
    bad_files = [record(f"bad-{kind}", SINGLE, name) for kind, name in bad_images.items()]
    malformed = [
        {"id": "role", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hi"}]},
        {"id": "order", "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hi"}]},
        {"id": "untagged", "image": "good.png", "conversations": conversation(SINGLE, image=False)},
        {"id": "imageless", "conversations": conversation(SINGLE, image=True)},
        {"id": "two-tags", "image": "good.png", "conversations": conversation([("<image> Hi", "Hello")])},
    ]
    reasons = ["unknown role 'bot'", "must alternate", "no <image> tag", "<image> tag but no image", "2 <image> tags"]
    records = good + bad_files + malformed
    dataset = LLaVADataset(records, tmp_path, TOKENIZERS["llama2"], image_size=32, max_bad_fraction=0.5,
                           check_images=False)  # the images as they fail when they load (checked up front: below)
    assert len(dataset) == len(good) + len(bad_files) and len(dataset.skipped) == len(malformed)
    for message, bad, reason in zip(dataset.skipped, malformed, reasons):
        assert f"(id {bad['id']})" in message and reason in message
    items = [dataset[k] for k in range(len(dataset))]
    assert [item["id"] for item in items if "error" not in item] == ["good-image", "good-text"]
    for item, (kind, name) in zip(items[2:], bad_images.items()):
        assert item["id"] == f"bad-{kind}" and str(tmp_path / name) in item["error"]
    batch = Collator(pad_token_id=0, max_length=4096, num_image_tokens=4)(items)
    assert batch["ids"] == ["good-image", "good-text"] and batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["skipped"] == [item["error"] for item in items[2:]]

    with pytest.raises(ValueError, match="5 of 12 records are malformed"):
        LLaVADataset(records, tmp_path, TOKENIZERS["llama2"], check_images=False)  # default max_bad_fraction=0.01
    (tmp_path / "broken.json").write_text('[\n  {"id": "a", "conversations": []},\n  {"id": }\n]')
    with pytest.raises(ValueError, match=r"broken.json: malformed JSON at line 3, column 10"):
        LLaVADataset(str(tmp_path / "broken.json"), tmp_path, TOKENIZERS["llama2"])



def test_unreadable_images_are_found_before_training_each_once_with_the_count_and_the_fraction_that_allows_them(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    bad_images = write_bad_images(tmp_path)
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "good.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:-20])  # a PNG cut short: verify sees it
    good = [record(f"good-{k}", SINGLE, "good.png") for k in range(20)]
    bad = [record(f"bad-{kind}", SINGLE, name) for kind, name in bad_images.items() if kind != "truncated"]
    records = good + bad + [record("cut-1", SINGLE, "cut.png"), record("cut-2", MULTI, "cut.png")]
    dataset = LLaVADataset(records, tmp_path, TOKENIZERS["llama2"], image_size=32, max_bad_fraction=0.5)
    assert [dataset[k]["id"] for k in range(len(dataset))] == [f"good-{k}" for k in range(20)]  # never in a step
    assert [message.split(":")[0] for message in dataset.skipped] == [f"sample {r['id']}" for r in records[20:]]
    assert "skipped 6 of 26 records" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"6 of 26 records are malformed or have an unreadable image, more than the 0 "
                                         r"--max_bad_fraction 0.01 allows; --max_bad_fraction 0.23 would skip them"):
        LLaVADataset(records, tmp_path, TOKENIZERS["llama2"], image_size=32)

# ----------------------------------------------------------------------------------------------------------------------
# Batching and sampling


def item(sample_id, turns, tokenizer, image=True, image_first=True):
    input_ids, labels = encode_conversation(conversation(turns, image), tokenizer, image_first=image_first)
    pixels = torch.full((3, 4, 4), float(len(input_ids))) if image else None
    return dict(id=sample_id, input_ids=torch.tensor(input_ids), labels=torch.tensor(labels), pixel_values=pixels)


def test_collator_pads_right_masks_and_stacks_images_in_order():
    tokenizer = TOKENIZERS["byte_level"]
    items = [item("a", MULTI, tokenizer), item("b", SINGLE, tokenizer, image=False), item("c", SINGLE, tokenizer)]
    batch = Collator(pad_token_id=3, max_length=1000, num_image_tokens=5)(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths and batch["ids"] == ["a", "b", "c"]
    for row, i in enumerate(items):
        assert torch.equal(batch["input_ids"][row, :lengths[row]], i["input_ids"])
        assert (batch["input_ids"][row, lengths[row]:] == 3).all()
        assert (batch["labels"][row, lengths[row]:] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.stack([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["skipped"] == []
    assert Collator(3, 1000, 5)([item("b", SINGLE, tokenizer, image=False)])["pixel_values"] is None


def test_packing_collator_lays_the_kept_samples_end_to_end_in_one_row_with_their_lengths():
    tokenizer = TOKENIZERS["byte_level"]
    items = [item("a", MULTI, tokenizer), item("b", SINGLE, tokenizer, image=False), item("c", SINGLE, tokenizer),
             dict(id="d", error="sample d: cannot load image")]
    long_one = item("e", MULTI * 4, tokenizer)  # longer than max_length once its image counts: cut from the end
    max_length = len(items[0]["input_ids"]) + 30
    assert len(long_one["input_ids"]) > max_length
    batch = Collator(pad_token_id=3, max_length=max_length, num_image_tokens=5, pack=True)(items + [long_one])
    kept = [i["input_ids"] for i in items[:3]] + [long_one["input_ids"][:max_length - 4]]
    assert batch["samples"] == [len(ids) for ids in kept] and batch["ids"] == ["a", "b", "c", "e"]
    assert batch["input_ids"].tolist() == [torch.cat(kept).tolist()] and batch["attention_mask"].all()
    assert batch["labels"].tolist() == [torch.cat([i["labels"] for i in items[:3]]
                                                  + [long_one["labels"][:max_length - 4]]).tolist()]
    assert torch.equal(batch["pixel_values"], torch.stack([items[k]["pixel_values"] for k in (0, 2)]
                                                          + [long_one["pixel_values"]]))
    assert batch["skipped"] == ["sample d: cannot load image"]
    empty = Collator(3, 1000, 5, pack=True)([items[3]])
    assert empty["input_ids"].shape == (0, 0) and empty["samples"] == []


@pytest.mark.parametrize("name", ["llama2", "byte_level"])
@pytest.mark.parametrize("image_first", [True, False])
def test_truncation_counts_image_tokens_keeps_labels_exact_and_never_cuts_an_image(name, image_first):
    tokenizer, num_image_tokens = TOKENIZERS[name], 20
    full = item("x", MULTI, tokenizer, image_first=image_first)
    ids, labels = full["input_ids"].tolist(), full["labels"].tolist()
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    answers = [label for label in labels if label != IGNORE_INDEX]
    first_answer = labels.index(answers[0])
    for max_length in range(1, len(ids) + num_image_tokens + 2):
        batch = Collator(0, max_length, num_image_tokens)([full])
        if max_length < image_at + num_image_tokens:  # the image would be cut
            assert batch["ids"] == [] and "cuts its image" in batch["skipped"][0]
            assert batch["input_ids"].shape == (0, 0) and batch["pixel_values"] is None
            continue
        kept = min(len(ids), max_length - (num_image_tokens - 1))
        if kept <= first_answer:
            assert batch["ids"] == [] and "no answer token" in batch["skipped"][0]
            continue
        assert batch["input_ids"][0].tolist() == ids[:kept]
        kept_labels = [label for label in batch["labels"][0].tolist() if label != IGNORE_INDEX]
        assert kept_labels == answers[:len(kept_labels)] and kept_labels == [
            token for token, label in zip(ids[:kept], labels[:kept]) if label != IGNORE_INDEX]
        assert tokenizer.decode(answers).startswith(tokenizer.decode(kept_labels))
        assert len(batch["input_ids"][0]) + num_image_tokens - 1 <= max_length


class Unshuffled:
    """A stand-in for numpy's Generator whose permutations leave everything in place, to work an order out by hand."""

    def permutation(self, n):
        return np.arange(n)


def test_modality_length_grouped_order_is_llavas_worked_out_by_hand():
    # LLaVA's rule (llava_trainer.py), unshuffled, 2 micro-batches of 2 per global batch. Image samples 0-7, text 8-10.
    lengths = [5, 9, 1, 7, 3, 8, 2, 6, -4, -10, -2]
    # image global batch [0 1 2 3] longest first is 1(9) 3(7) 0(5) 2(1), dealt each to the lighter micro-batch not yet
    # full: 1 -> a (9), 3 -> b (7), 0 -> b (12, full), 2 -> a: [1 2] [3 0]. [4 5 6 7]: 5(8) 7(6) 4(3) 6(2): [5 6] [7 4].
    # Text [8 9 10] does not split evenly in 2: every 2nd of 9(10) 8(4) 10(2), [9 10] [8]. The last global batch of
    # each modality makes the remainder [5 6 7 4 9 10 8]: its first 4 lead the epoch, the rest ends it.
    assert modality_length_grouped_order(lengths, 2, 2, Unshuffled()) == [5, 6, 7, 4, 1, 2, 3, 0, 9, 10, 8]
    # one micro-batch per global batch (one process, no accumulation): each modality's samples sorted, longest first,
    # image [0 2 1] and text [4 3] both short of a global batch of 4: the remainder [0 2 1 4 3] leads with 4 of them
    assert modality_length_grouped_order([3, 1, 2, -1, -5], 4, 1, Unshuffled()) == [0, 2, 1, 4, 3]


def test_modality_length_grouped_order_covers_the_epoch_with_even_micro_batches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(1000)] + [-rng.randint(1, 300) for _ in range(333)]
    batch_size, chunks = 4, 6
    order = modality_length_grouped_order(lengths, batch_size, chunks, np.random.default_rng(0))
    assert sorted(order) == list(range(len(lengths)))  # every sample once
    global_batches = [order[start:start + batch_size * chunks] for start in range(0, len(order), batch_size * chunks)]
    for batch in global_batches[1:-1]:  # the full ones of one modality: micro-batches of even total length
        assert len({lengths[i] > 0 for i in batch}) == 1
        totals = [sum(abs(lengths[i]) for i in batch[k:k + batch_size]) for k in range(0, len(batch), batch_size)]
        assert max(totals) - min(totals) <= 300
    assert order != modality_length_grouped_order(lengths, batch_size, chunks, np.random.default_rng(1))
