"""A bad class id is refused with one message, whichever way it comes in: the HTTP routes, the batcher, the CLI."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dfkd.cli import main as dfkd_main
from shared.errors import InvalidRequestError
from shared.teacher import TeacherCard, load_teacher
from synth_service.app import create_app
from synth_service.engine import InversionEngine
from synth_service.labels import check_class_ids

BAD = [0, 12]
MESSAGE = "unknown class id(s) [12] for teacher 'tiny': valid ids are 0..9"


@pytest.fixture(scope="module")
def card_path(tmp_path_factory):
    """An untrained 10-class digits teacher: refusing an id needs no trained weights."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.json"
    TeacherCard(name="tiny", arch="digits_cnn", num_classes=10, in_chans=1, image_size=16, mean=(0.5,), std=(0.5,),
                class_names=[str(i) for i in range(10)]).write(path)
    return path


@pytest.fixture(scope="module")
def client(digits_settings, card_path):
    with TestClient(create_app(digits_settings, teacher=load_teacher(card_path))) as c:
        yield c


def test_the_check_itself(card_path):
    card = TeacherCard.read(card_path)
    assert check_class_ids(card, [3, 3, 9]) == [3, 3, 9]
    with pytest.raises(InvalidRequestError) as exc:
        check_class_ids(card, BAD)
    assert str(exc.value) == MESSAGE
    with pytest.raises(InvalidRequestError, match=r"\[-1, 10, 11, .*\] \(and 2 more\) for teacher"):
        check_class_ids(card, [-1, *range(10, 21)])
    with pytest.raises(InvalidRequestError, match="at least one"):
        check_class_ids(card, [])


@pytest.mark.parametrize("method,path,body,field", [
    ("POST", "/v1/images", {"class_ids": BAD, "per_class": 1}, "class_ids"),
    ("POST", "/v1/jobs", {"class_ids": BAD, "per_class": 50}, "class_ids"),
    ("PUT", "/v1/production", {"enabled": False, "classes": BAD}, "classes"),
])
def test_http_routes_give_the_message(client, method, path, body, field):
    res = client.request(method, path, json=body)
    assert res.status_code == 422, res.text
    assert res.json()["detail"] == [{"loc": ["body", field], "msg": MESSAGE, "type": "value_error"}]


def test_batcher_gives_the_message(client):
    with pytest.raises(InvalidRequestError) as exc:
        client.app.state.service.batcher.submit(BAD, None, seed=0)
    assert str(exc.value) == MESSAGE


def test_engine_and_cli_give_the_message(digits_settings, card_path, tmp_path, capsys):
    with InversionEngine(load_teacher(card_path), digits_settings.synth) as engine, \
            pytest.raises(InvalidRequestError) as exc:
        engine.synthesize_classes(BAD, 2)
    assert str(exc.value) == MESSAGE
    code = dfkd_main(["synth", "--config", "digits", "--teacher", str(card_path), "--classes", "0,12",
                      "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"dfkd: error: {MESSAGE}"
