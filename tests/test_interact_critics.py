"""Critic backends: heuristic on synthetic images, openai against a loopback server, transformers
on a tiny random Qwen2-VL built offline."""

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from artaug_ext.interact.critics import (
    CriticError,
    HeuristicCritic,
    OpenAICritic,
    TransformersCritic,
    convention_for,
    convention_of_config,
    instruction,
    make_critic,
    smart_resize,
)
from artaug_ext.tiny.vocab import WORDS

# ---------------------------------------------------------------------------- heuristic


def test_heuristic_finds_overexposed_top_and_dark_bottom():
    a = np.full((96, 96, 3), 128, np.uint8)
    a[:, :, 0] = 200  # a saturated mid-tone image with texture, so only exposure is off
    rng = np.random.default_rng(0)
    a = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    a[:32] = 252
    a[64:] = 8
    r = HeuristicCritic(max_suggestions=6).critique(Image.fromarray(a), "a red square")
    top = [s for s in r.suggestions if s.box[1] == 0.0]
    bottom = [s for s in r.suggestions if s.box[1] > 0.6]
    assert top and all(s.category == "exposure" and "normal light" in s.prompt for s in top)
    assert bottom and all(s.category == "exposure" and "bright light" in s.prompt for s in bottom)
    assert r.reason == ""


def test_heuristic_words_are_in_the_tiny_vocabulary():
    rng = np.random.default_rng(1)
    for img in (np.zeros((48, 48, 3), np.uint8), np.full((48, 48, 3), 255, np.uint8),
                rng.integers(0, 255, (48, 48, 3)).astype(np.uint8), np.full((48, 48, 3), (10, 20, 90), np.uint8)):
        r = HeuristicCritic().critique(Image.fromarray(img), "")
        assert r.suggestions
        for s in r.suggestions:
            words = re.findall(r"[a-z]+", s.prompt.lower())
            assert all(w in WORDS for w in words), s.prompt


def test_heuristic_deterministic_and_honest_when_fine():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 60, 3)).astype(np.uint8))
    assert HeuristicCritic().critique(img, "x") == HeuristicCritic().critique(img, "x")
    assert "light meter" in HeuristicCritic.__doc__ and "NO understanding" in HeuristicCritic.__doc__
    calm = HeuristicCritic(min_severity=10.0).critique(img, "x")
    assert calm.suggestions == [] and calm.reason


def test_smart_resize_and_conventions():
    assert smart_resize(1024, 1024) == (980, 980)
    h, w = smart_resize(100, 3000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 1280 * 28 * 28
    h, w = smart_resize(20, 20)
    assert h * w >= 4 * 28 * 28 and h % 28 == 0
    assert convention_for("Qwen/Qwen2-VL-72B-Instruct") == "qwen2-vl"
    assert convention_for("Qwen2.5-VL-7B-Instruct") == "qwen2.5-vl"
    assert convention_for("qwen3-vl-plus") == "qwen3-vl"
    assert convention_for("glm-4.5v") == "glm-v"
    assert "a cat" in instruction("a cat") and "bbox_2d" in instruction("a cat")
    with pytest.raises(ValueError, match="unknown critic"):
        make_critic("nope")


# ---------------------------------------------------------------------------- openai


class FakeServer:
    """Chat-completions on 127.0.0.1: answers from a script of (status, content, delay)."""

    def __init__(self, script, default=(200, "[]", 0.0)):
        self.script, self.default, self.requests = list(script), default, []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, content, delay = server.script.pop(0) if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True
                try:
                    time.sleep(delay)
                    if callable(content):
                        content = content(body)
                    payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                               if status == 200 else json.dumps({"error": {"message": content}}))
                    data = payload.encode()
                    # No longer in flight once the answer starts to leave: the client may send its
                    # next request as soon as it has read it, before this thread goes on.
                    with server.lock:
                        server.in_flight -= 1
                        counted = False
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    if counted:
                        with server.lock:
                            server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(script, **kw):
        s = FakeServer(script, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def sent_image(body) -> Image.Image:
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


QWEN2_ANSWER = "<|object_ref_start|>lighting: warm bright light<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"


def test_openai_request_shape_and_qwen2_tokens(server_factory, monkeypatch):
    monkeypatch.setenv("TEST_CRITIC_KEY", "sk-test")
    srv = server_factory([(200, QWEN2_ANSWER, 0.0)])
    critic = OpenAICritic(srv.url, "Qwen2-VL-72B-Instruct", api_key_env="TEST_CRITIC_KEY")
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    r = critic.critique(image, "a red circle")
    assert [s.box for s in r.suggestions] == [(0.0, 0.0, 0.5, 0.5)] and r.suggestions[0].category == "lighting"
    (req,) = srv.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "Qwen2-VL-72B-Instruct" and body["skip_special_tokens"] is False
    assert sent_image(body).size == (64, 48)  # Qwen2-VL: relative grid, no resize needed
    assert "a red circle" in body["messages"][0]["content"][1]["text"]


def test_openai_qwen25_resizes_and_maps_absolute_boxes(server_factory):
    def answer(body):
        w, h = sent_image(body).size
        return f'```json\n[{{"bbox_2d": [0, 0, {w // 2}, {h}], "label": "vivid red colors"}}]\n```'

    srv = server_factory([(200, answer, 0.0)])
    critic = OpenAICritic(srv.url, "Qwen2.5-VL-7B-Instruct")
    r = critic.critique(Image.new("RGB", (100, 60)), "x")
    assert sent_image(srv.requests[0]["body"]).size == (112, 56)  # smart_resize(60, 100)
    assert r.suggestions[0].box == (0.0, 0.0, 0.5, 1.0)


def test_openai_retries_5xx_and_timeouts(server_factory):
    srv = server_factory([(503, "busy", 0.0), (500, "oops", 0.0), (200, "slow", 2.0), (200, QWEN2_ANSWER, 0.0)])
    critic = OpenAICritic(srv.url, "qwen2-vl", timeout=0.5, max_retries=3, backoff=0.01)
    r = critic.critique(Image.new("RGB", (32, 32)), "x")
    assert len(r.suggestions) == 1 and len(srv.requests) == 4


def test_openai_gives_up_after_bounded_retries(server_factory):
    srv = server_factory([], default=(502, "down", 0.0))
    critic = OpenAICritic(srv.url, "qwen2-vl", max_retries=2, backoff=0.01)
    with pytest.raises(CriticError, match="failed 3 times; last: HTTP 502"):
        critic.critique(Image.new("RGB", (32, 32)), "x")
    assert len(srv.requests) == 3


def test_openai_4xx_is_a_clear_error_without_retry(server_factory):
    srv = server_factory([(401, "invalid api key", 0.0)])
    critic = OpenAICritic(srv.url, "qwen2-vl", backoff=0.01)
    with pytest.raises(CriticError, match="HTTP 401.*invalid api key.*API key"):
        critic.critique(Image.new("RGB", (32, 32)), "x")
    assert len(srv.requests) == 1


def test_openai_drops_skip_special_tokens_when_rejected(server_factory):
    srv = server_factory([(400, "unknown field skip_special_tokens", 0.0), (200, "sky(0,0),(1000,500)", 0.0)])
    r = OpenAICritic(srv.url, "qwen2-vl", backoff=0.01).critique(Image.new("RGB", (32, 32)), "x")
    assert "skip_special_tokens" not in srv.requests[1]["body"] and r.suggestions[0].prompt == "sky"
    srv = server_factory([(400, "unknown field skip_special_tokens", 0.0), (200, "sky(0,0),(1000,500)", 0.0)])
    r = OpenAICritic(srv.url, "qwen2-vl", max_retries=0).critique(Image.new("RGB", (32, 32)), "x")
    assert len(srv.requests) == 2 and r.suggestions[0].prompt == "sky"  # the resend is not a retry


def test_openai_concurrency_limit(server_factory):
    srv = server_factory([], default=(200, QWEN2_ANSWER, 0.15))
    critic = OpenAICritic(srv.url, "qwen2-vl", max_concurrency=2)
    results = critic.critique_many([(Image.new("RGB", (16, 16)), f"p{i}") for i in range(6)])
    assert len(results) == 6 and all(len(r.suggestions) == 1 for r in results)
    assert srv.max_in_flight <= 2 and len(srv.requests) == 6


def test_openai_needs_url_and_model(monkeypatch):
    monkeypatch.delenv("ARTAUG_CRITIC_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="base URL and a model"):
        OpenAICritic(None, None)


# ---------------------------------------------------------------------------- transformers


def tiny_qwen2_vl():
    """A random 1-layer Qwen2-VL with a character-level tokenizer, all built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
    vocab = {c: i for i, c in enumerate([chr(i) for i in range(32, 127)] + ["\n"])}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials)
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                                 tokenizer=fast, video_processor=Qwen2VLVideoProcessor(), chat_template=chat)
    ids = dict(eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|im_start|>"])
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, **ids),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, in_chans=3, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"], **ids)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


def test_transformers_backend_on_tiny_random_qwen2_vl():
    model, processor = tiny_qwen2_vl()
    critic = TransformersCritic(model, processor, convention="qwen2-vl", max_new_tokens=24)
    r = critic.critique(Image.new("RGB", (64, 64), (200, 10, 10)), "a red circle")
    assert r.suggestions == [] and r.reason  # random weights: garbage text, no boxes, and it says why


def test_transformers_convention_comes_from_the_config_not_the_folder_name(tmp_path):
    from types import SimpleNamespace

    import torch

    assert convention_of_config(SimpleNamespace(model_type="qwen2_5_vl")) == "qwen2.5-vl"
    assert convention_of_config(SimpleNamespace(model_type="glm4v")) == "glm-v"
    assert convention_of_config(SimpleNamespace(model_type="llava")) is None
    model, processor = tiny_qwen2_vl()
    folder = tmp_path / "Qwen2.5-VL-finetune"  # a misleading folder name: the config decides
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    critic = TransformersCritic.from_pretrained(str(folder), device_map="cpu", torch_dtype=torch.float32)
    assert convention_for(str(folder)) == "qwen2.5-vl" and critic.convention == "qwen2-vl"
    assert TransformersCritic.from_pretrained(str(folder), device_map="cpu", torch_dtype=torch.float32,
                                              convention="glm-v").convention == "glm-v"


def test_qwen2_vl_json_answer_is_read_on_the_1000_grid(server_factory):
    srv = server_factory([(200, '[{"bbox_2d": [0, 0, 500, 250], "label": "bright light"}]', 0.0)])
    r = OpenAICritic(srv.url, "Qwen2-VL-72B-Instruct").critique(Image.new("RGB", (64, 64)), "x")
    assert r.suggestions[0].box == (0.0, 0.0, 0.5, 0.25)
