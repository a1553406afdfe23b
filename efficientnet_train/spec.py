"""The CreateAlgorithm request body (`container/algorithm-spec.json`), generated from the schema.

    python -m efficientnet_train.spec > container/algorithm-spec.json

Image URIs, and the role and S3 locations of the validation that AWS runs before a Marketplace
listing, are placeholders that scripts/aws_register_algorithm.py fills in.
"""

from __future__ import annotations

import json

from .hyperparameters import sagemaker_hyperparameter_specs
from .metrics import VAL_ACC_1, VAL_MAP, metric_definitions

TRAINING_IMAGE_PLACEHOLDER = "<TRAINING_IMAGE_URI>"
# Today the same image as training (started with `serve`); its own placeholder lets a slimmer one replace it.
INFERENCE_IMAGE_PLACEHOLDER = "<INFERENCE_IMAGE_URI>"
# The validation AWS runs before it lets the algorithm be listed: the seller's role and sample data.
VALIDATION_ROLE_PLACEHOLDER = "<VALIDATION_ROLE_ARN>"
VALIDATION_DATA_PLACEHOLDER = "<VALIDATION_DATA_S3_URI>"  # holds train/<label>/ and val/<label>/
VALIDATION_OUTPUT_PLACEHOLDER = "<VALIDATION_OUTPUT_S3_URI>"
IMAGE_CONTENT_TYPES = ["image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp", "image/tiff",
                       "application/x-image"]
TRAINING_INSTANCE_TYPES = ["ml.p3.2xlarge", "ml.p3.8xlarge", "ml.p3.16xlarge", "ml.p3dn.24xlarge",
                           "ml.p4d.24xlarge", "ml.g4dn.xlarge", "ml.g4dn.2xlarge", "ml.g4dn.12xlarge",
                           "ml.g5.xlarge", "ml.g5.2xlarge", "ml.g5.12xlarge", "ml.m5.2xlarge", "ml.c5.4xlarge"]


# A Ground Truth augmented manifest, streamed in Pipe mode with RecordWrapperType RecordIO (manifests.py).
RECORDIO_CONTENT_TYPE = "application/x-recordio"


def _channel(name: str, description: str, required: bool = True, content_types=IMAGE_CONTENT_TYPES,
             pipe: bool = False) -> dict:
    return {"Name": name, "Description": description, "IsRequired": required,
            "SupportedContentTypes": content_types + ([RECORDIO_CONTENT_TYPE] if pipe else []),
            "SupportedCompressionTypes": ["None"], "SupportedInputModes": ["File", "FastFile"] + (["Pipe"] * pipe)}


def algorithm_spec() -> dict:
    return {
        "AlgorithmName": "efficientnet-image-classifier",
        "AlgorithmDescription": "Fine-tunes an ImageNet-pretrained EfficientNet (timm) on a folder of labelled "
                                "images: one folder per label in the train and val channels.",
        "TrainingSpecification": {
            "TrainingImage": TRAINING_IMAGE_PLACEHOLDER,
            "SupportedHyperParameters": sagemaker_hyperparameter_specs(),
            "SupportedTrainingInstanceTypes": TRAINING_INSTANCE_TYPES,
            "SupportsDistributedTraining": True,  # one process per GPU of every instance: distributed.py
            "MetricDefinitions": metric_definitions(),
            "TrainingChannels": [
                _channel("train", "Training images: train/<label>/<image>, the folder names the labels; or in Pipe "
                                  "mode a Ground Truth image classification manifest (AttributeNames source-ref, "
                                  "LABEL, LABEL-metadata; RecordIO).", pipe=True),
                _channel("val", "Optional validation images: val/<label>/<image>, with labels that are also in "
                                "train, or a Ground Truth manifest as for train. Without it the job holds out "
                                "val_fraction of each class of train.",
                         required=False, pipe=True),
                _channel("model", "Optional: a previous job's model.tar.gz to continue training from "
                                  "(incremental training); a changed label set gets a new classifier head.",
                         required=False, content_types=["application/x-tar", "application/gzip"]),
                _channel("pretrained", "Optional: one timm weights file (.pth or .safetensors) of the chosen model "
                                       "to start from instead of the ImageNet weights in the image.",
                         required=False, content_types=["application/octet-stream"]),
            ],
            # validation:mAP for several labels an image, whose jobs log no acc_1
            "SupportedTuningJobObjectiveMetrics": [{"Type": "Maximize", "MetricName": VAL_ACC_1},
                                                   {"Type": "Maximize", "MetricName": VAL_MAP}],
        },
        "InferenceSpecification": inference_specification(),
        "ValidationSpecification": validation_specification(),
        "CertifyForMarketplace": True,
    }


def _s3_channel(name: str, uri: str) -> dict:
    return {"ChannelName": name, "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}


def validation_specification() -> dict:
    """One short training job on the seller's sample data, then a batch transform of its val images.

    AWS runs it when the algorithm is created; only an algorithm whose validation succeeded can be listed.
    The defaults apply except epochs, so it also checks that the image ships the default model's weights.
    """
    data, output = VALIDATION_DATA_PLACEHOLDER, VALIDATION_OUTPUT_PLACEHOLDER
    return {
        "ValidationRole": VALIDATION_ROLE_PLACEHOLDER,
        "ValidationProfiles": [{
            "ProfileName": "one-epoch-then-batch-transform",
            "TrainingJobDefinition": {
                "TrainingInputMode": "File",
                "HyperParameters": {"epochs": "1"},
                "InputDataConfig": [_s3_channel("train", f"{data}/train"), _s3_channel("val", f"{data}/val")],
                "OutputDataConfig": {"S3OutputPath": f"{output}/training"},
                "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
                "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
            },
            "TransformJobDefinition": {
                "MaxConcurrentTransforms": 1,
                "MaxPayloadInMB": 6,
                "BatchStrategy": "SingleRecord",
                "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"{data}/val"}},
                                   "ContentType": "image/jpeg", "CompressionType": "None", "SplitType": "None"},
                "TransformOutput": {"S3OutputPath": f"{output}/transform", "Accept": "application/jsonlines",
                                    "AssembleWith": "Line"},
                "TransformResources": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1},
            },
        }],
    }


# `serve` answers any image/* body; these are the ones Pillow decodes that buyers send. JSON carries several.
INFERENCE_CONTENT_TYPES = ["image/jpeg", "image/png", "application/x-image", "image/webp", "image/bmp", "image/gif",
                           "image/tiff", "application/json"]
INFERENCE_RESPONSE_TYPES = ["application/json", "application/jsonlines", "application/json;verbose"]
# An EfficientNet answers one image in tens of milliseconds on a CPU: CPU instances suffice for real-time;
# GPUs pay off for batch transform, where the server batches concurrent requests.
REALTIME_INSTANCE_TYPES = ["ml.m5.large", "ml.m5.xlarge", "ml.m5.2xlarge", "ml.c5.xlarge", "ml.c5.2xlarge",
                           "ml.g4dn.xlarge", "ml.g5.xlarge"]
TRANSFORM_INSTANCE_TYPES = ["ml.m5.xlarge", "ml.m5.2xlarge", "ml.c5.2xlarge", "ml.c5.4xlarge", "ml.g4dn.xlarge",
                            "ml.g4dn.2xlarge", "ml.p3.2xlarge"]


def inference_specification() -> dict:
    return {
        "Containers": [{"Image": INFERENCE_IMAGE_PLACEHOLDER}],
        "SupportedTransformInstanceTypes": TRANSFORM_INSTANCE_TYPES,
        "SupportedRealtimeInferenceInstanceTypes": REALTIME_INSTANCE_TYPES,
        "SupportedContentTypes": INFERENCE_CONTENT_TYPES,
        "SupportedResponseMIMETypes": INFERENCE_RESPONSE_TYPES,
    }


def render() -> str:
    return json.dumps(algorithm_spec(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")
