package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/distribution/distribution/v3/registry/api/errcode"

	"github.com/berth-dev/berth/engine"
)

// The node API's error codes beside the registry's own (UNAUTHORIZED):
// the body is the registry error JSON, with the typed kind in detail.
var (
	ErrorCodeInvalid = errcode.Register("berth.prewarm", errcode.ErrorDescriptor{
		Value: "PREWARM_INVALID", Message: "invalid pre-warm request",
		Description: "The request is malformed: bad JSON, no images, a bad platform or time.", HTTPStatusCode: http.StatusBadRequest,
	})
	ErrorCodeNoSpace = errcode.Register("berth.prewarm", errcode.ErrorDescriptor{
		Value: "PREWARM_NO_SPACE", Message: "the pins do not fit the cache budget",
		Description: "Pinning the blobs asked for beside the pins in force would exceed the node's cache budget; nothing was pinned.", HTTPStatusCode: http.StatusInsufficientStorage,
	})
	ErrorCodeJobUnknown = errcode.Register("berth.prewarm", errcode.ErrorDescriptor{
		Value: "PREWARM_JOB_UNKNOWN", Message: "no such job",
		Description: "The job id names no job this node knows.", HTTPStatusCode: http.StatusNotFound,
	})
	ErrorCodeFailed = errcode.Register("berth.prewarm", errcode.ErrorDescriptor{
		Value: "PREWARM_FAILED", Message: "the request failed",
		Description: "The node could not do what was asked; detail.kind says why.", HTTPStatusCode: http.StatusBadGateway,
	})
)

// writeError answers with the registry error JSON; kind goes in detail.
func writeError(w http.ResponseWriter, status int, code errcode.ErrorCode, kind, msg string) {
	e := code.WithMessage(msg)
	if kind != "" {
		e = e.WithDetail(map[string]string{"kind": kind})
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(errcode.Errors{e})
}

// statusOfKind is the HTTP status an engine error kind is answered with.
func statusOfKind(k engine.Kind) int {
	switch k {
	case engine.KindNotFound:
		return http.StatusNotFound
	case engine.KindDenied:
		return http.StatusForbidden
	case engine.KindRateLimited:
		return http.StatusTooManyRequests
	case engine.KindInvalidName, engine.KindInvalidReference, engine.KindUnknownRegistry, engine.KindUnsupported:
		return http.StatusBadRequest
	case engine.KindNoSpace:
		return http.StatusInsufficientStorage
	default:
		return http.StatusBadGateway
	}
}

// infoOf turns an error into its typed form.
func infoOf(err error) *ErrorInfo {
	if err == nil {
		return nil
	}
	var ei *ErrorInfo
	if errors.As(err, &ei) {
		return ei
	}
	switch {
	case errors.Is(err, context.Canceled):
		return &ErrorInfo{Kind: StateCanceled, Message: err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &ErrorInfo{Kind: "timeout", Message: err.Error()}
	}
	return &ErrorInfo{Kind: string(engine.KindOf(err)), Message: err.Error()}
}

// apiErrorBody decodes a registry error JSON body into a typed error.
func apiErrorBody(status int, body []byte) *ErrorInfo {
	var env struct {
		Errors []struct {
			Code    string          `json:"code"`
			Message string          `json:"message"`
			Detail  json.RawMessage `json:"detail"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &env) != nil || len(env.Errors) == 0 {
		msg := string(body)
		if len(msg) > 200 {
			msg = msg[:200] + "..."
		}
		return &ErrorInfo{Kind: "bad_answer", Message: http.StatusText(status) + ": " + msg}
	}
	e := env.Errors[0]
	var d struct {
		Kind string `json:"kind"`
	}
	_ = json.Unmarshal(e.Detail, &d)
	kind := d.Kind
	switch {
	case kind != "":
	case e.Code == "UNAUTHORIZED":
		kind = "unauthorized"
	case e.Code == ErrorCodeNoSpace.String():
		kind = string(engine.KindNoSpace)
	default:
		kind = "bad_answer"
	}
	return &ErrorInfo{Kind: kind, Message: e.Code + ": " + e.Message}
}
