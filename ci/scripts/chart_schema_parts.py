"""JSON Schema pieces of the chart-owned values (Kubernetes knobs of every stage).

The `global` and `config` parts come from `trajflow schema`; everything here is the
charts' own vocabulary. Schemas are draft-07 so that Helm 3 (gojsonschema) and Helm 4
(santhosh-tekuri/jsonschema) read them alike.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any

from trajflow.config.formats import (
    ABSOLUTE_PATH,
    CHART_JOB_LABEL,
    CHART_MOUNT_PATH,
    CHART_POD_LABEL,
    CONTAINER_ENV_NAME,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DURATION,
    IMAGE_DIGEST,
    IMAGE_REGISTRY_OR_EMPTY,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    LABEL_VALUE,
    OBJECT_NAME_OR_EMPTY,
    QUALIFIED_NAME,
    QUANTITY,
    SECRET_ENV,
    SECRET_LOCATION_ENV,
)

DRAFT = "http://json-schema.org/draft-07/schema#"


def closed(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


def string(description: str = "", **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", **extra}
    if description:
        schema["description"] = description
    return schema


def integer(description: str = "", *, minimum: int | None = None, maximum: int | None = None,
            nullable: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": ["integer", "null"] if nullable else "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def boolean(description: str = "") -> dict[str, Any]:
    return {"type": "boolean", "description": description} if description else {"type": "boolean"}


def string_map(description: str = "", value: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": value or {"type": "string"}}
    if description:
        schema["description"] = description
    return schema


def labels(chart_owned: str = CHART_POD_LABEL) -> dict[str, Any]:
    """Extra labels: valid keys and values, none of those the chart sets itself."""
    return {**string_map(value={"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}),
            "propertyNames": {"pattern": QUALIFIED_NAME, "not": {"pattern": chart_owned}}}


def quantity(description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {
        "anyOf": [
            {"type": "string", "pattern": QUANTITY},
            {"type": "number", "minimum": 0},
        ]
    }
    if description:
        schema["description"] = description
    return schema


def any_object(description: str = "") -> dict[str, Any]:
    return {"type": "object", "description": description} if description else {"type": "object"}


def image() -> dict[str, Any]:
    return closed(
        {
            "registry": string("Image registry; global.imageRegistry replaces it when set",
                               pattern=IMAGE_REGISTRY_OR_EMPTY),
            "repository": string("Image repository", pattern=IMAGE_REPOSITORY),
            "tag": string("Image tag; empty: the chart's appVersion", pattern=IMAGE_TAG),
            "digest": string("Image digest", pattern=IMAGE_DIGEST),
            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
        },
        required=["repository"],
    )


def pull_secrets() -> dict[str, Any]:
    return {
        "type": "array",
        "items": closed({"name": string(pattern=DNS_SUBDOMAIN)}, required=["name"]),
    }


def service_account() -> dict[str, Any]:
    return closed(
        {
            "create": boolean("Create a ServiceAccount for the stage"),
            "name": string("ServiceAccount name", pattern=OBJECT_NAME_OR_EMPTY, maxLength=253),
            "annotations": string_map("ServiceAccount annotations (workload identity)"),
        },
        required=["create"],
    )


def resources() -> dict[str, Any]:
    names = {"type": "object", "propertyNames": {"pattern": QUALIFIED_NAME},
             "additionalProperties": quantity()}
    return closed(
        {
            "requests": names,
            "limits": deepcopy(names),
            "claims": {"type": "array", "items": closed({"name": string(), "request": string()}, required=["name"])},
        }
    )


def toleration() -> dict[str, Any]:
    return {
        **closed(
            {
                "key": string(),
                "operator": {"type": "string", "enum": ["Exists", "Equal"]},
                "value": string(),
                "effect": {"type": "string", "enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
                "tolerationSeconds": integer(nullable=True),
            }
        ),
        # as the API server has it: an Exists toleration matches any value, so it may not name one
        "if": {"properties": {"operator": {"const": "Exists"}}, "required": ["operator"]},
        "then": {"properties": {"value": {"maxLength": 0, "description": "empty when operator is Exists"}}},
    }


def topology_spread_constraint() -> dict[str, Any]:
    return closed(
        {
            "maxSkew": integer(minimum=1, maximum=INT32_MAX),
            "topologyKey": string(minLength=1),
            "whenUnsatisfiable": {"type": "string", "enum": ["DoNotSchedule", "ScheduleAnyway"]},
            "labelSelector": any_object(),
            "matchLabelKeys": {"type": "array", "items": string()},
            "minDomains": integer(minimum=1, maximum=INT32_MAX),
            "nodeAffinityPolicy": {"type": "string", "enum": ["Honor", "Ignore"]},
            "nodeTaintsPolicy": {"type": "string", "enum": ["Honor", "Ignore"]},
        },
        required=["maxSkew", "topologyKey", "whenUnsatisfiable"],
    )


def affinity() -> dict[str, Any]:
    return closed({"nodeAffinity": any_object(), "podAffinity": any_object(), "podAntiAffinity": any_object()})


def seccomp_profile() -> dict[str, Any]:
    return closed(
        {
            "type": {"type": "string", "enum": ["RuntimeDefault", "Localhost"],
                     "description": "Unconfined is not allowed"},
            "localhostProfile": string(),
        },
        required=["type"],
    )


# Kubernetes keeps these fields as int32: a larger number passes helm and fails at the API server
INT32_MAX = 2**31 - 1
NON_ROOT_UID = integer("Never 0: pods run as non-root", minimum=1, maximum=INT32_MAX)


def pod_security_context() -> dict[str, Any]:
    """Merged over the secure defaults; nothing here may turn them off."""
    return closed(
        {
            "runAsNonRoot": {"const": True, "description": "Pods never run as root"},
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": integer(minimum=0, maximum=INT32_MAX),
            "fsGroup": integer(minimum=0, maximum=INT32_MAX),
            "fsGroupChangePolicy": {"type": "string", "enum": ["Always", "OnRootMismatch"]},
            "supplementalGroups": {"type": "array", "items": integer(minimum=0, maximum=INT32_MAX)},
            "supplementalGroupsPolicy": {"type": "string", "enum": ["Merge", "Strict"]},
            "seccompProfile": seccomp_profile(),
            "appArmorProfile": any_object(),
            "seLinuxOptions": any_object(),
            "seLinuxChangePolicy": string(),
            "sysctls": {"type": "array", "items": closed({"name": string(), "value": string()}, required=["name", "value"])},
        }
    )


def container_security_context() -> dict[str, Any]:
    return closed(
        {
            "runAsNonRoot": {"const": True, "description": "Containers never run as root"},
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": integer(minimum=0, maximum=INT32_MAX),
            "allowPrivilegeEscalation": {"const": False},
            "privileged": {"const": False},
            "readOnlyRootFilesystem": {"const": True, "description": "HOME and TMPDIR are a writable /tmp emptyDir"},
            "capabilities": closed(
                {
                    "drop": {"type": "array", "items": string(), "contains": {"const": "ALL"}},
                    "add": {"type": "array", "items": {"type": "string", "enum": ["NET_BIND_SERVICE"]}},
                }
            ),
            "seccompProfile": seccomp_profile(),
            "appArmorProfile": any_object(),
            "seLinuxOptions": any_object(),
            "procMount": {"type": "string", "enum": ["Default"]},
        }
    )


def env_var() -> dict[str, Any]:
    schema = closed(
        {
            "name": string(pattern=CONTAINER_ENV_NAME),
            "value": string(),
            "valueFrom": any_object(),
        },
        required=["name"],
    )
    # A secret's value never sits in values: take it from a Secret (valueFrom.secretKeyRef).
    schema["if"] = {"properties": {"name": {"pattern": SECRET_ENV, "not": {"pattern": SECRET_LOCATION_ENV}}},
                    "required": ["name"]}
    schema["then"] = {
        "required": ["valueFrom"],
        "properties": {
            "value": {
                "not": {},
                "description": "plain-text secret: use valueFrom.secretKeyRef (or extraEnvFrom) instead of value",
            }
        },
    }
    return schema


def env_from() -> dict[str, Any]:
    ref = closed({"name": string(minLength=1), "optional": boolean()}, required=["name"])
    return closed({"configMapRef": ref, "secretRef": deepcopy(ref), "prefix": string()})


# what the chart's pods hold already: an extra volume or mount of the same name or path would
# be a duplicate the API server refuses
CHART_VOLUMES = ["config", "tmp", "shm", "data", "trajflow-dataset"]


def volume() -> dict[str, Any]:
    return {"type": "object", "required": ["name"],
            "properties": {"name": string(pattern=DNS_LABEL, **{"not": {"enum": CHART_VOLUMES}})}}


def volume_mount() -> dict[str, Any]:
    return closed(
        {
            "name": string(minLength=1),
            "mountPath": string(pattern=ABSOLUTE_PATH, **{"not": {"pattern": CHART_MOUNT_PATH}}),
            "subPath": string(),
            "subPathExpr": string(),
            "readOnly": boolean(),
            "recursiveReadOnly": {"type": "string", "enum": ["Disabled", "IfPossible", "Enabled"]},
            "mountPropagation": {"type": "string", "enum": ["None", "HostToContainer"]},
        },
        required=["name", "mountPath"],
    )


def pod_failure_policy() -> dict[str, Any]:
    exit_codes = closed(
        {
            "containerName": string(),
            "operator": {"type": "string", "enum": ["In", "NotIn"]},
            "values": {"type": "array", "minItems": 1, "maxItems": 255, "uniqueItems": True,
                       "items": integer(minimum=0, maximum=255)},
        },
        required=["operator", "values"],
    )
    # the API server refuses exit code 0 under In (a success is never a failure to match)
    exit_codes["if"] = {"properties": {"operator": {"const": "In"}}}
    exit_codes["then"] = {"properties": {"values": {"items": {"minimum": 1}}}}
    condition = closed(
        {"type": string(minLength=1), "status": {"type": "string", "enum": ["True", "False", "Unknown"]}},
        required=["type"],
    )
    rule = closed(
        {
            "action": {"type": "string", "enum": ["FailJob", "FailIndex", "Ignore", "Count"]},
            "onExitCodes": exit_codes,
            "onPodConditions": {"type": "array", "minItems": 1, "items": condition},
        },
        required=["action"],
    )
    rule["oneOf"] = [{"required": ["onExitCodes"]}, {"required": ["onPodConditions"]}]  # exactly one matcher
    return {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {"rules": {"type": "array", "maxItems": 20, "items": rule}},
        "required": ["rules"],
        "description": "Kubernetes podFailurePolicy of the Job; null: none",
    }


def shm() -> dict[str, Any]:
    return closed({"enabled": boolean(), "sizeLimit": quantity()}, required=["enabled", "sizeLimit"])


def tmp() -> dict[str, Any]:
    return closed({"sizeLimit": quantity(), "requestStorage": boolean()}, required=["sizeLimit"])


def pod_vocabulary() -> dict[str, Any]:
    """Keys every stage chart has (pods, images, scheduling, security)."""
    return {
        "enabled": boolean("Render this stage"),
        "image": image(),
        "imagePullSecrets": pull_secrets(),
        "serviceAccount": service_account(),
        "podAnnotations": string_map(),
        "podLabels": labels(),
        "nodeSelector": string_map(),
        "tolerations": {"type": "array", "items": toleration()},
        "affinity": affinity(),
        "topologySpreadConstraints": {"type": "array", "items": topology_spread_constraint()},
        "priorityClassName": string(pattern=OBJECT_NAME_OR_EMPTY),
        "runtimeClassName": string(pattern=OBJECT_NAME_OR_EMPTY),
        "resources": resources(),
        "podSecurityContext": pod_security_context(),
        "containerSecurityContext": container_security_context(),
        "extraEnv": {"type": "array", "items": env_var()},
        "extraEnvFrom": {"type": "array", "items": env_from()},
        "extraVolumes": {"type": "array", "items": volume()},
        "extraVolumeMounts": {"type": "array", "items": volume_mount()},
        "shm": shm(),
        "tmp": tmp(),
        # Always set: it is what lets a FailIndex rule fail one shard rather than the Job.
        "backoffLimitPerIndex": integer("Retries of each index", minimum=0, maximum=INT32_MAX),
        "maxFailedIndexes": integer("Failed indexes before the Job fails", minimum=0, maximum=100000, nullable=True),
        "podFailurePolicy": pod_failure_policy(),
        "activeDeadlineSeconds": integer(minimum=1, nullable=True),
        "ttlSecondsAfterFinished": integer(minimum=0, maximum=INT32_MAX, nullable=True),
        "rerun": integer("Raise to run the stage's Job again under a new name", minimum=0, maximum=INT32_MAX),
        "syncWave": integer("ArgoCD sync wave", minimum=-100, maximum=100),
        "jobLabels": labels(CHART_JOB_LABEL),
        "jobAnnotations": string_map(),
    }


POD_REQUIRED = [
    "enabled", "image", "serviceAccount", "resources", "shm", "tmp",
    "backoffLimitPerIndex", "syncWave", "config",
]


def batch_stage_vocabulary() -> dict[str, Any]:
    """Indexed Job stages where shards and parallelism are independent."""
    return {
        # Indexed Jobs may have at most 100000 completions.
        "shards": integer("Shards: the Job's completions", minimum=1, maximum=100000),
        "parallelism": integer("Pods at once (0 pauses the Job)", minimum=0, maximum=100000),
    }


def wait_vocabulary(default_description: str) -> dict[str, Any]:
    return {
        "waitResources": resources(),
        # a bare number is seconds, as `trajflow wait --timeout` reads it; 0 would give up at
        # once, before any download could finish (nobody means that)
        "waitTimeout": {"anyOf": [string(pattern=DURATION, minLength=1), integer(minimum=1)],
                        "description": default_description},
    }


def training_vocabulary() -> dict[str, Any]:
    return {
        "nodes": integer("Training pods (rendezvous nodes)", minimum=1, maximum=10000),
        "nprocPerNode": integer("Worker processes per pod; null: the GPU limit", minimum=1, maximum=64, nullable=True),
        "maxRestarts": integer("Restarts of the worker group (the launcher's --max-restarts)", minimum=0, maximum=1000),
        # the launcher's shutdown timeout is this - 15 s, and must be positive
        "terminationGracePeriodSeconds": integer("Seconds a pod has to stop after SIGTERM", minimum=30,
                                                 maximum=86400),
        "launcher": {"type": "string", "enum": ["job", "pytorchjob"]},
        "rendezvous": closed(
            {
                "port": integer(minimum=1024, maximum=65535),
                "joinTimeoutSeconds": integer(minimum=1),
            },
            required=["port", "joinTimeoutSeconds"],
        ),
        "clusterDomain": string(pattern=DNS_SUBDOMAIN),
        "inputShards": integer("Preprocessed shards to wait for", minimum=1, maximum=100000),
    }


def network_policy() -> dict[str, Any]:
    peers = {"type": "array", "items": any_object("NetworkPolicyPeer")}
    return closed(
        {
            "enabled": boolean(),
            "dnsTo": peers,
            "dnsPorts": {"type": "array", "minItems": 1, "uniqueItems": True,
                         "items": integer(minimum=1, maximum=65535)},
            "storageTo": deepcopy(peers),
            "sourceTo": deepcopy(peers),
            "pushgatewayTo": deepcopy(peers),
            "metricsFrom": deepcopy(peers),
            "pushgatewayFrom": deepcopy(peers),
            "pushgatewayScrapeFrom": deepcopy(peers),
            "extraEgress": {"type": "array", "items": any_object("NetworkPolicyEgressRule")},
        },
        required=["enabled"],
    )


def global_constraints() -> list[dict[str, Any]]:
    """What the chart needs of `global` beyond the model's field types."""
    return [
        {
            "if": {"properties": {"storage": {"properties": {"type": {"const": "s3"}}, "required": ["type"]}},
                   "required": ["storage"]},
            "then": {"properties": {"storage": {"properties": {"s3": {
                "properties": {"bucket": {"minLength": 1, "description": "required when storage.type is s3"}},
                "required": ["bucket"]}}, "required": ["s3"]}}},
        },
        {
            "if": {"properties": {"storage": {"properties": {
                "type": {"const": "filesystem"},
                "pvc": {"properties": {"create": {"const": False}}, "required": ["create"]}},
                "required": ["pvc"]}}, "required": ["storage"]},
            "then": {"properties": {"storage": {"properties": {"pvc": {
                "properties": {"existingClaim": {"minLength": 1,
                                                 "description": "required when pvc.create is false"}},
                "required": ["existingClaim"]}}}}},
        },
    ]
