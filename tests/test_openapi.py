"""The live app against its own OpenAPI document (schemathesis, every check): schema-valid requests
are answered, schema-invalid ones get a 4xx, every reply matches the declared status codes and
schemas, and nothing is a 5xx.

The JSON schema cannot say "a decodable JPEG or PNG of the encoder's size" or "no <image> or </s>
in the question"; the operations' descriptions say it in words. For schema-valid (positive)
cases the test makes the generated data meet those two written rules, so that "valid data is
accepted" is tested on what the documentation promises; negative cases are sent as generated.
"""

from __future__ import annotations

import io

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image


@pytest.fixture(scope="module")
def encoder_jpeg(served) -> bytes:
    import httpx

    size = tuple(httpx.get(f"{served}/v1/models", timeout=30).json()["encoder_size"])
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 160, 90)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def follow_written_rules(case, image: bytes) -> None:
    """Positive cases: the image a valid upload, the question without prompt tokens and within the
    token limit (the tiny model's word-level tokenizer has at most one token per character)."""
    if not isinstance(case.body, dict) or "image" not in case.body:
        return
    case.body["image"] = image
    question = case.body.get("question")
    if isinstance(question, str):
        cleaned = question.replace("<", "")[:200]
        case.body["question"] = cleaned if cleaned.strip() else "what is it?"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_app_conforms_to_its_openapi_document(served, encoder_jpeg, mode):
    """Every operation of /openapi.json, schemathesis's cases of one mode through all its checks
    (no 5xx, status codes, content types, response schemas and headers, positive data accepted,
    negative data rejected). Run with Hypothesis directly (schemathesis's pytest plugin does not
    load with this pytest)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    failures, ran = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(GenerationMode(mode))

        @given(case=strategy)
        @settings(
            max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case):
            if case.meta is not None and case.meta.generation.mode.is_positive:
                follow_written_rules(case, encoder_jpeg)
            ran[operation.label] = ran.get(operation.label, 0) + 1
            case.call_and_validate(base_url=served, timeout=60)

        try:
            run()
        except Unsatisfiable:  # an operation without inputs (GET /healthz) has no negative data
            assert mode == "negative", operation.label
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {exc}")
    print(f"schemathesis {mode}: {ran}")
    assert ran, "no operation was generated"
    assert not failures, "\n\n".join(f[:3000] for f in failures)


def _browser() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_interactive_docs_render_with_the_network_off(served, tmp_path):
    """/docs and /redoc in a real headless Chromium whose every non-loopback request goes to a dead
    proxy: Swagger UI and ReDoc must come from the app itself and render the API's operations."""
    import os
    import subprocess

    browser = _browser()
    if browser is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium not installed (CI=true: .ci/run must install Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does)")
    offline = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--virtual-time-budget=15000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    for page, marker in (("docs", "opblock-summary-path"), ("redoc", "operation-")):
        dom = subprocess.run(
            [*offline, "--dump-dom", f"{served}/{page}"], capture_output=True, text=True, timeout=120
        ).stdout
        for path in ("/v1/query", "/v1/refine", "/v1/models"):
            assert path in dom, f"/{page} did not render {path}"
        assert marker in dom, f"/{page} did not run its script (no {marker!r} in the DOM)"
    shot = os.environ.get("COLLAB_DOCS_SCREENSHOT", str(tmp_path / "docs.png"))
    subprocess.run(
        [*offline, "--window-size=1280,1400", f"--screenshot={shot}", f"{served}/docs"],
        capture_output=True,
        timeout=120,
    )
    assert os.path.getsize(shot) > 10_000
