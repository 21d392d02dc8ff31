"""The reward wire contract: msgpack over HTTP, validated with pydantic. Imports no torch."""

from protocol.client import RewardClient
from protocol.codec import (
    build_request,
    decode_image,
    decode_image_list,
    decode_images,
    encode_image,
    pack,
    parse_reply,
    parse_request,
    reply_gradients,
    unpack,
)
from protocol.errors import ProtocolError, RewardServerError, Unreachable
from protocol.schema import (
    MEDIA_TYPE,
    VERSION,
    ErrorReply,
    Image,
    Limits,
    ScoreGradReply,
    ScoreGradRequest,
    ScoreReply,
    ScoreRequest,
    Video,
    VideoScoreRequest,
    check_scores,
)
from protocol.video import build_video_request, decode_videos, video_request_parts

__all__ = [
    "MEDIA_TYPE",
    "VERSION",
    "ErrorReply",
    "Image",
    "Limits",
    "ProtocolError",
    "RewardClient",
    "RewardServerError",
    "ScoreGradReply",
    "ScoreGradRequest",
    "ScoreReply",
    "ScoreRequest",
    "Unreachable",
    "Video",
    "VideoScoreRequest",
    "build_request",
    "build_video_request",
    "check_scores",
    "decode_image",
    "decode_image_list",
    "decode_images",
    "decode_videos",
    "encode_image",
    "pack",
    "parse_reply",
    "parse_request",
    "reply_gradients",
    "unpack",
    "video_request_parts",
]
