"""The Azure IoT Hub / IoT Edge transport (`transport: azure`), behind the optional `edgefleet[azure]` extra.

Importing this package imports no Azure code: `azure_session` loads the SDK only when the agent is
configured for Azure, so a device without the extra runs the MQTT transport as before.
"""

from __future__ import annotations

from device_agent.config import AgentSettings
from fleet_protocol.mqtt import Birth, PublishingSession
from fleet_protocol.topics import Topics

INSTALL_HINT = "pip install 'edgefleet[azure]'"


class AzureExtraMissingError(ValueError):
    """`transport: azure` without the azure-iot-device SDK installed."""


def azure_session(
    settings: AgentSettings,
    topics: Topics,
    *,
    birth: Birth | None = None,
) -> PublishingSession:
    """The agent's session over Azure IoT Hub / IoT Edge (see `device_agent.azure.session`)."""
    try:
        from device_agent.azure.session import AzureSession
    except ImportError as error:
        raise AzureExtraMissingError(
            f"transport: azure needs the Azure IoT device SDK, which is not installed ({error}): "
            f"run `{INSTALL_HINT}`, or set transport: mqtt"
        ) from error
    return AzureSession(settings, topics, birth=birth)
