"""Scan a TLS server with sslyze and check it against Mozilla's "intermediate" configuration.

Runs in its own environment (``make`` creates ``.venv-scan``: sslyze pins an older
``cryptography`` than fedge uses), so it imports nothing of fedge or the tests::

    .venv-scan/bin/python tests/support/tls_scan.py HOST PORT SERVER_NAME CA_FILE

Only the scan commands the Mozilla checker needs run. The certificate chain is validated
against ``CA_FILE`` (the private CA the agents pin) instead of public roots. Prints one JSON
object: ``issues`` (the checker's findings, empty when compliant) and what was seen (TLS
versions, TLS 1.2 suites, curves).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from sslyze import (
    CertificateInfoExtraArgument,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.scanner.models import ScanCommandsExtraArguments


def main(host: str, port: int, server_name: str, ca_file: Path) -> dict[str, object]:
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=server_name, port=port, ip_address=host),
        scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    if result.scan_status != ServerScanStatusEnum.COMPLETED:
        return {"error": f"scan {result.scan_status.name}: {result.connectivity_error_trace}"}
    issues: dict[str, str] = {}
    try:
        check_server_against_tls_configuration(
            result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
        )
    except ServerNotCompliantWithTlsConfiguration as exc:
        issues = dict(exc.issues)
    scan = result.scan_result
    assert scan is not None
    versions = []
    for name, label in (
        ("ssl_2_0_cipher_suites", "SSLv2"),
        ("ssl_3_0_cipher_suites", "SSLv3"),
        ("tls_1_0_cipher_suites", "TLSv1"),
        ("tls_1_1_cipher_suites", "TLSv1.1"),
        ("tls_1_2_cipher_suites", "TLSv1.2"),
        ("tls_1_3_cipher_suites", "TLSv1.3"),
    ):
        outcome = getattr(scan, name).result
        if outcome is not None and outcome.is_tls_version_supported:
            versions.append(label)
    tls12 = scan.tls_1_2_cipher_suites.result
    curves = scan.elliptic_curves.result
    return {
        "issues": issues,
        "tls_versions": versions,
        "tls12_suites": sorted(
            s.cipher_suite.name for s in (tls12.accepted_cipher_suites if tls12 else [])
        ),
        "curves": sorted(c.name for c in (curves.supported_curves or [] if curves else [])),
    }


if __name__ == "__main__":
    # sslyze's bundled public trust stores hold old roots that cryptography warns about.
    warnings.simplefilter("ignore")
    host, port, server_name, ca = sys.argv[1:5]
    print(json.dumps(main(host, int(port), server_name, Path(ca))))
