"""Mistakes a new user makes on the command line get a message naming the flag, before any model loads."""

import argparse

import pytest

from nexus_jax.cli import service
from nexus_jax.cli.service import register


def parser():
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_a_missing_tls_file_is_a_usage_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(service, "serve_front", lambda args: loads.append(args))  # would load the model
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    for flags, named in ((["--tls-cert", str(cert), "--tls-key", str(tmp_path / "nokey.pem")], "--tls-key"),
                         (["--tls-cert", str(tmp_path / "nocert.pem"), "--tls-key", str(cert)], "--tls-cert"),
                         (["--tls-cert", str(tmp_path), "--tls-key", str(cert)], "--tls-cert")):
        args = parser().parse_args(["serve", *flags])
        with pytest.raises(SystemExit) as e:
            args.func(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {named}: cannot read {tmp_path}" in err and "Traceback" not in err
    assert not loads
