"""The trained digits CNN, once per test session: its ONNX file and its data splits."""
import logging

import pytest

from quant.digits import export, load_digits_split, train_cnn


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    train, calibration, validation = load_digits_split()
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    export(train_cnn(*train), path)
    return {"path": str(path), "calib": calibration, "val": validation}


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelname, record.getMessage()))


@pytest.fixture
def kiln_log():
    """kiln's log records (its logger does not propagate to pytest's caplog)."""
    logger = logging.getLogger("kiln")
    handler, level = Captured(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)
