"""JSON schemas for the custom resources infra/k8s uses, which kubernetes-validate (built-in
kinds only) does not know: KEDA's ScaledObject and TriggerAuthentication, Managed Service for
Prometheus' PodMonitoring.

Written from KEDA's documentation (keda.sh/docs/latest/reference/scaledobject-spec and
.../concepts/authentication) and prometheus-engine's CRD (monitoring.googleapis.com/v1) for
the fields a manifest here may use; additionalProperties
is false wherever the field set is known, so a misspelt field fails instead of being
ignored by the cluster. A CRD not listed here is an error: add its schema.
"""

from __future__ import annotations

_STRING = {"type": "string"}
_INT = {"type": "integer"}

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _STRING,
        "namespace": _STRING,
        "labels": {"type": "object", "additionalProperties": _STRING},
        "annotations": {"type": "object", "additionalProperties": _STRING},
    },
}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    """A custom resource's schema: its apiVersion, kind, metadata and `spec`, nothing else."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                       "spec": spec},
        "additionalProperties": False,
    }


# gcp-pubsub scaler parameters (keda.sh/docs/latest/scalers/gcp-pub-sub); all strings.
_GCP_PUBSUB_METADATA = {
    "type": "object",
    "properties": {
        name: _STRING
        for name in (
            "subscriptionName", "subscriptionNameFromEnv", "topicName", "topicNameFromEnv", "mode", "value",
            "activationValue", "aggregation", "timeHorizon", "valueIfNull", "credentialsFromEnv",
            "credentialsFromEnvFile",
        )
    },
    "additionalProperties": False,
    "oneOf": [
        {"required": ["subscriptionName"]},
        {"required": ["subscriptionNameFromEnv"]},
        {"required": ["topicName"]},
        {"required": ["topicNameFromEnv"]},
    ],
}

_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "properties": {
        "type": _STRING,
        "name": _STRING,
        "metadata": {"type": "object", "additionalProperties": _STRING},
        "authenticationRef": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": _STRING,
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
            "additionalProperties": False,
        },
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
    },
    "additionalProperties": False,
    "if": {"properties": {"type": {"const": "gcp-pubsub"}}},
    "then": {"properties": {"metadata": _GCP_PUBSUB_METADATA}},
}

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": _STRING, "kind": _STRING, "apiVersion": _STRING, "envSourceContainerName": _STRING,
            },
            "additionalProperties": False,
        },
        "pollingInterval": _INT,
        "cooldownPeriod": _INT,
        "initialCooldownPeriod": _INT,
        "idleReplicaCount": _INT,
        "minReplicaCount": _INT,
        "maxReplicaCount": _INT,
        "fallback": {
            "type": "object",
            "required": ["failureThreshold", "replicas"],
            "properties": {"failureThreshold": _INT, "replicas": _INT, "behavior": _STRING},
            "additionalProperties": False,
        },
        "advanced": {
            "type": "object",
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "properties": {
                        "name": _STRING,
                        # autoscaling/v2 HorizontalPodAutoscalerBehavior
                        "behavior": {
                            "type": "object",
                            "properties": {
                                direction: {
                                    "type": "object",
                                    "properties": {
                                        "stabilizationWindowSeconds": _INT,
                                        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                                        "policies": {"type": "array"},
                                    },
                                    "additionalProperties": False,
                                }
                                for direction in ("scaleUp", "scaleDown")
                            },
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
                "scalingModifiers": {"type": "object"},
            },
            "additionalProperties": False,
        },
        "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
    },
    "additionalProperties": False,
})

TRIGGER_AUTHENTICATION = _resource("keda.sh/v1alpha1", "TriggerAuthentication", {
    "type": "object",
    "properties": {
        "podIdentity": {
            "type": "object",
            "required": ["provider"],
            "properties": {
                "provider": {"enum": ["none", "azure-workload", "aws", "aws-eks", "gcp"]},
                "identityId": _STRING,
                "identityTenantId": _STRING,
                "identityAuthorityHost": _STRING,
                "roleArn": _STRING,
                "identityOwner": {"enum": ["keda", "workload"]},
            },
            "additionalProperties": False,
        },
        "secretTargetRef": {"type": "array"},
        "env": {"type": "array"},
        "configMapTargetRef": {"type": "array"},
        "hashiCorpVault": {"type": "object"},
        "azureKeyVault": {"type": "object"},
        "awsSecretManager": {"type": "object"},
        "gcpSecretManager": {"type": "object"},
        "boundServiceAccountToken": {"type": "array"},
    },
    "additionalProperties": False,
})

_DURATION = {"type": "string", "pattern": r"^((\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"}

POD_MONITORING = _resource("monitoring.googleapis.com/v1", "PodMonitoring", {
    "type": "object",
    "required": ["selector", "endpoints"],
    "properties": {
        "selector": {
            "type": "object",
            "properties": {
                "matchLabels": {"type": "object", "additionalProperties": _STRING},
                "matchExpressions": {"type": "array"},
            },
            "additionalProperties": False,
        },
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["port"],
                "properties": {
                    "port": {"type": ["string", "integer"]},
                    "scheme": {"enum": ["http", "https"]},
                    "path": _STRING,
                    "params": {"type": "object"},
                    "interval": _DURATION,
                    "timeout": _DURATION,
                    "metricRelabeling": {"type": "array"},
                    "proxyUrl": _STRING,
                    "authorization": {"type": "object"},
                    "basicAuth": {"type": "object"},
                    "oauth2": {"type": "object"},
                    "tls": {"type": "object"},
                },
                "additionalProperties": False,
            },
        },
        "targetLabels": {"type": "object"},
        "limits": {"type": "object"},
        "filterRunning": {"type": "boolean"},
    },
    "additionalProperties": False,
})

SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
    ("monitoring.googleapis.com/v1", "PodMonitoring"): POD_MONITORING,
}
