"""Configuration from the environment: which broker `AgentMessageBus.from_env()` and the `amb`
command pick, and in which order (README, "Configuration from the environment")."""

from __future__ import annotations

import logging

import pytest

from amb_core import AgentMessageBus
from amb_core.adapters import KafkaBroker, MemoryBroker, NATSBroker, RabbitMQBroker, RedisBroker
from amb_core.config import url_from_env


def test_nothing_set_is_memory() -> None:
    assert url_from_env({}) == "memory://"
    assert url_from_env({"HOME": "/root", "PATH": "/bin"}) == "memory://"


def test_amb_url_wins_over_every_broker_variable() -> None:
    environ = {"AMB_URL": "nats://n:4222", "REDIS_URL": "redis://r:6379/0",
               "RABBITMQ_URL": "amqp://guest:guest@q:5672/", "KAFKA_SERVERS": "k:9092"}
    assert url_from_env(environ) == "nats://n:4222"


@pytest.mark.parametrize(("variable", "value", "url"), [
    ("REDIS_URL", "redis://r:6379/1", "redis://r:6379/1"),
    ("REDIS_URL", "rediss://:pw@r:6380/0", "rediss://:pw@r:6380/0"),
    ("NATS_URL", "nats://n:4222", "nats://n:4222"),
    ("NATS_URL", "nats://a:4222,nats://b:4222", "nats://a:4222,b:4222"),  # nats CLI style
    ("NATS_URL", "nats://a:4222, b:4222", "nats://a:4222,b:4222"),
    ("RABBITMQ_URL", "amqp://guest:guest@q:5672/", "amqp://guest:guest@q:5672/"),
    ("AMQP_URL", "amqps://u:p@q:5671/vh", "amqps://u:p@q:5671/vh"),
    ("KAFKA_SERVERS", "k1:9092", "kafka://k1:9092"),
    ("KAFKA_SERVERS", "k1:9092, k2:9092", "kafka://k1:9092,k2:9092"),
])
def test_one_broker_variable_names_the_broker(variable: str, value: str, url: str) -> None:
    assert url_from_env({variable: value}) == url


def test_rabbitmq_url_and_amqp_url_are_one_broker() -> None:
    same = "amqp://guest:guest@q:5672/"
    assert url_from_env({"RABBITMQ_URL": same, "AMQP_URL": same}) == same
    with pytest.raises(ValueError, match="RABBITMQ_URL and AMQP_URL"):
        url_from_env({"RABBITMQ_URL": same, "AMQP_URL": "amqp://other:5672/"})


def test_two_brokers_without_amb_url_is_ambiguous() -> None:
    environ = {"REDIS_URL": "redis://r:6379/0", "NATS_URL": "nats://n:4222",
               "KAFKA_SERVERS": "k:9092"}
    with pytest.raises(ValueError) as info:
        url_from_env(environ)
    text = str(info.value)
    assert "KAFKA_SERVERS, NATS_URL, REDIS_URL" in text and "AMB_URL" in text
    assert url_from_env({**environ, "AMB_URL": "redis://r:6379/0"}) == "redis://r:6379/0"


def test_empty_values_count_as_unset() -> None:
    assert url_from_env({"AMB_URL": "", "REDIS_URL": "  "}) == "memory://"
    assert url_from_env({"AMB_URL": " ", "NATS_URL": "nats://n:4222"}) == "nats://n:4222"


def test_a_variable_holding_the_wrong_kind_of_url_is_named_and_masked() -> None:
    with pytest.raises(ValueError) as info:
        url_from_env({"REDIS_URL": "amqp://user:secret@r:6379"})
    assert "REDIS_URL" in str(info.value) and "redis://" in str(info.value)
    assert "secret" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(ValueError, match="KAFKA_SERVERS"):
        url_from_env({"KAFKA_SERVERS": "PLAINTEXT://k:9092"})


def test_the_default_environ_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AMB_URL", "REDIS_URL", "NATS_URL", "RABBITMQ_URL", "AMQP_URL",
                 "KAFKA_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NATS_URL", "nats://n:4222")
    assert url_from_env() == "nats://n:4222"


@pytest.mark.parametrize(("environ", "broker_class"), [
    ({"AMB_URL": "memory://"}, MemoryBroker),
    ({"REDIS_URL": "redis://r:6379/0"}, RedisBroker),
    ({"NATS_URL": "nats://n:4222"}, NATSBroker),
    ({"AMQP_URL": "amqp://guest:guest@q:5672/"}, RabbitMQBroker),
    ({"KAFKA_SERVERS": "k:9092"}, KafkaBroker),
])
def test_from_env_builds_that_broker(monkeypatch: pytest.MonkeyPatch,
                                     environ: dict[str, str], broker_class: type) -> None:
    for name in ("AMB_URL", "REDIS_URL", "NATS_URL", "RABBITMQ_URL", "AMQP_URL",
                 "KAFKA_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    bus = AgentMessageBus.from_env(request_timeout=3.0, observer=False)
    assert type(bus.broker) is broker_class
    assert bus.request_timeout == 3.0  # bus options pass through


def test_from_env_warns_only_when_it_falls_back_to_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("AMB_URL", "REDIS_URL", "NATS_URL", "RABBITMQ_URL", "AMQP_URL",
                 "KAFKA_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="amb_core"):
        assert type(AgentMessageBus.from_env(observer=False).broker) is MemoryBroker
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AMB_URL" in warnings[0].getMessage()
    assert "in-memory" in warnings[0].getMessage()
    caplog.clear()
    monkeypatch.setenv("AMB_URL", "memory://")  # chosen on purpose: nothing to warn about
    with caplog.at_level(logging.INFO, logger="amb_core"):
        AgentMessageBus.from_env(observer=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_from_env_reports_ambiguity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMB_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("NATS_URL", "nats://n:4222")
    with pytest.raises(ValueError, match="NATS_URL, REDIS_URL"):
        AgentMessageBus.from_env()
