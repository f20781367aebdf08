/*
 * massv.h — C API of massv, speculative decoding for vision-language models.
 *
 * massv answers a prompt about an image with a Qwen2.5-VL target model, optionally sped
 * up by a small drafter (a MASSV drafter sees the image through a projector; a text
 * drafter sees the prompt alone). At temperature 0 the answer is exactly the target's
 * own greedy answer; the drafter only changes how fast it comes.
 *
 * Library:   libmassv.so (shared) or libmassv.a (static), built by `cargo build -p massv-ffi`.
 * Link:      cc app.c -I<include> -L<libdir> -lmassv -Wl,-rpath,<libdir>
 *            static: cc app.c -I<include> <libdir>/libmassv.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
 * Language:  C99 or later, C++11 or later (the declarations are wrapped in extern "C").
 *
 * A minimal program:
 *
 *     massv_engine *engine = NULL;
 *     massv_request *req = NULL;
 *     if (massv_engine_load("models/target", NULL, "auto", &engine) != MASSV_OK ||
 *         massv_request_create("Describe the image.", &req) != MASSV_OK ||
 *         massv_request_set_image_file(req, "cat.png") != MASSV_OK ||
 *         massv_generate(engine, req, print_piece, NULL) != MASSV_OK)
 *         fprintf(stderr, "error: %s\n", massv_last_error());
 *     massv_request_free(&req);
 *     massv_engine_free(&engine);
 *
 * ---------------------------------------------------------------------------------------
 * Conventions (they hold for every function unless its comment says otherwise)
 * ---------------------------------------------------------------------------------------
 *
 * Status.  Functions return a massv_status: MASSV_OK (0) on success, a negative code on
 *   failure. On failure, massv_last_error() describes what went wrong and output
 *   parameters are left as documented for that function (handles are set to NULL).
 *
 * Errors are per thread.  massv_last_error() returns the message of the most recent
 *   status-returning call made *by the calling thread*: "" after MASSV_OK, a one-line
 *   UTF-8 message after a failure. The pointer stays valid until that thread's next
 *   status-returning massv call (or its exit); copy the text to keep it.
 *
 * No exceptions cross the boundary.  massv is written in Rust; an internal bug (a Rust
 *   panic) is caught at the entry point and reported as MASSV_ERR_INTERNAL. It never
 *   unwinds into the caller and never aborts the process through this API. Out-of-memory
 *   still aborts, as malloc failure does in most C libraries.
 *
 * Strings.  Every `const char *` argument is a NUL-terminated string. Prompts and device
 *   names must be valid UTF-8 (MASSV_ERR_INVALID_ARGUMENT otherwise); file and directory
 *   paths are taken as raw bytes on POSIX. massv never keeps a pointer you pass in: it
 *   copies what it needs before returning, so you may free or reuse your buffers at once.
 *
 * NULL.  A NULL handle, string or buffer where one is required is
 *   MASSV_ERR_INVALID_ARGUMENT, never a crash. Exceptions are spelled out (optional
 *   arguments, and the *_free functions, for which NULL is a no-op).
 *
 * Ownership.  Handles (massv_engine, massv_request) are created by massv and must be
 *   released with the matching *_free function, which takes the *address* of your handle
 *   variable and sets it to NULL: calling it twice on the same variable is therefore
 *   harmless. Freeing a copy of a handle that was already freed through another variable
 *   is undefined behaviour, as with free(). Strings returned by massv (version, error,
 *   status names) are owned by massv and must not be freed.
 *
 * Caller buffers (snprintf style).  Functions that copy variable-length output take a
 *   buffer and its capacity. They always report the full length through an optional
 *   out-parameter, copy as much as fits, and return MASSV_ERR_BUFFER_TOO_SMALL unless
 *   everything fit. (NULL, 0) is a valid buffer: use it to ask for the length first.
 *   (The acceptance array of massv_request_metrics() is the one exception: see there.)
 *
 * Threads.
 *   - A massv_engine is immutable after loading and every generation keeps its own caches,
 *     so ONE ENGINE MAY BE USED BY ANY NUMBER OF THREADS AT ONCE (each with its own
 *     request). It must not be freed while any call that uses it is still running.
 *   - A massv_request is used by one thread at a time. Using it from two threads at once
 *     is not undefined behaviour (freeing it excepted): the second call fails with
 *     MASSV_ERR_BUSY. The same happens when a token callback touches the request being
 *     generated.
 *   - A generation uses a pool of worker threads internally (one per CPU core).
 *
 * ABI.  The structs below are passed by value and may grow in a future minor version
 *   (before 1.0, any version may change the ABI). Always start from
 *   massv_generate_default_params() rather than a zeroed struct.
 */
#ifndef MASSV_H
#define MASSV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================================
 * Status codes, errors, version
 * ====================================================================================== */

typedef enum massv_status {
    /* Success. */
    MASSV_OK = 0,
    /* An argument is NULL, not UTF-8, empty where it must not be, out of range, or
     * inconsistent with the engine (e.g. an image for a text-only target, a draft mode
     * without a drafter, a prompt that does not fit the context). Also: asking for a
     * result before a generation succeeded. */
    MASSV_ERR_INVALID_ARGUMENT = -1,
    /* A model directory could not be loaded (missing or malformed files, unsupported
     * architecture, drafter incompatible with the target). */
    MASSV_ERR_LOAD = -2,
    /* The requested device is not available ("cuda" without a working driver and GPU, or
     * a model whose shapes the CUDA kernels do not serve). */
    MASSV_ERR_DEVICE = -3,
    /* An image could not be read or decoded (unreadable file, not PNG/JPEG/WebP, corrupt
     * data, RGB8 buffer of the wrong size). */
    MASSV_ERR_IMAGE = -4,
    /* Generation failed for another reason (tokenizer or model error). */
    MASSV_ERR_GENERATION = -5,
    /* A caller buffer was too small; it holds a truncated copy, the full length was
     * reported. Not a failure of the operation itself: the result is intact and can be
     * read again with a larger buffer. */
    MASSV_ERR_BUFFER_TOO_SMALL = -6,
    /* The request is being used by another call right now (another thread, or a token
     * callback touching its own request). */
    MASSV_ERR_BUSY = -7,
    /* An internal error (a bug in massv, caught before it reached the caller). The
     * handles involved remain safe to free; please report the message. */
    MASSV_ERR_INTERNAL = -8
} massv_status;

/* The version of massv, e.g. "0.1.0". Static storage; never NULL. */
const char *massv_version(void);

/* The error message of the calling thread's most recent status-returning call ("" if it
 * succeeded). Never NULL. Valid until this thread's next status-returning massv call. */
const char *massv_last_error(void);

/* The name of a status code, e.g. "MASSV_ERR_IMAGE" ("MASSV_ERR_UNKNOWN" for other
 * values). Static storage; never NULL. */
const char *massv_status_name(int status);

/* ======================================================================================
 * Engine: the loaded models
 * ====================================================================================== */

/* Opaque. Holds the target model, its tokenizer and image preprocessor, and the drafter
 * if one was given. Weights are memory-mapped from the model directories. */
typedef struct massv_engine massv_engine;

/*
 * Loads a target model and, optionally, a drafter.
 *
 *   target_dir   A Hugging Face model directory (config.json, *.safetensors, tokenizer
 *                files; preprocessor_config.json for a vision-language target). Required.
 *   drafter_dir  A drafter directory (a Qwen2 LM sharing the target's tokenizer; with
 *                massv.json + projector.safetensors it is a MASSV drafter), or NULL for
 *                plain target decoding.
 *   device       "auto", "cpu" or "cuda" (ASCII, case-insensitive), or NULL for "auto".
 *                "auto" runs the target's language model on the GPU when a driver, a
 *                GPU and kernels for the model's shapes are there, else on the CPU
 *                (a note on stderr); "cuda" fails with MASSV_ERR_DEVICE when they are
 *                not. The vision tower, the MASSV projector and the drafter's language
 *                model run beside the target's, on the GPU when the kernels serve
 *                their shapes, else on the CPU.
 *   out_engine   Receives the new engine; set to NULL on failure. Required.
 *
 * Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT (NULL/empty arguments, unknown device),
 * MASSV_ERR_DEVICE, MASSV_ERR_LOAD or MASSV_ERR_INTERNAL.
 * On success the caller owns *out_engine and releases it with massv_engine_free().
 */
massv_status massv_engine_load(const char *target_dir, const char *drafter_dir, const char *device,
                               massv_engine **out_engine);

/* Frees *engine and sets *engine to NULL. engine == NULL or *engine == NULL: no-op, so
 * freeing twice through the same variable is safe.
 * Free an engine only when no call is using it. As a safety net, while a generation is
 * running on the engine (e.g. when called from a token callback) this call does nothing
 * and leaves *engine unchanged; do not rely on it to synchronise threads. */
void massv_engine_free(massv_engine **engine);

/* 1 if the engine was loaded with a drafter, 0 if not or if engine is NULL. */
int massv_engine_has_drafter(const massv_engine *engine);

/* ======================================================================================
 * Generation parameters
 * ====================================================================================== */

typedef enum massv_draft_mode {
    /* MASSV for a MASSV drafter directory, text for a text-only one. */
    MASSV_DRAFT_MODE_AUTO = 0,
    /* The drafter sees the image through its projector (needs a MASSV drafter). */
    MASSV_DRAFT_MODE_MASSV = 1,
    /* The drafter sees the prompt with the image segment removed. */
    MASSV_DRAFT_MODE_TEXT = 2
} massv_draft_mode;

typedef struct massv_generate_params {
    /* Tokens drafted per verification pass; >= 1 with a drafter, ignored without. Default 5. */
    size_t gamma;
    /* 0 = greedy (deterministic, identical to the target alone); > 0 samples. Default 0. */
    float temperature;
    /* Keep only the k most likely tokens; 0 = off. Default 0. */
    size_t top_k;
    /* Nucleus sampling mass in (0, 1]; 1 = off. Default 1. */
    float top_p;
    /* Seed of the sampler: the same seed, inputs and parameters give the same tokens. Default 0. */
    uint64_t seed;
    /* Maximum number of generated tokens (a final stop token included); >= 1. Default 128. */
    size_t max_new_tokens;
    /* A massv_draft_mode value; anything but AUTO needs a drafter. Default AUTO. */
    int draft_mode;
} massv_generate_params;

/* The defaults listed above, identical to the `massv generate` command line's. */
massv_generate_params massv_generate_default_params(void);

/* ======================================================================================
 * Requests: one prompt (+ image, + parameters) and, after generation, its result
 * ====================================================================================== */

/* Opaque. Holds the prompt, an optional image, the generation parameters and the result
 * of the last successful massv_generate*() on it. A request may be generated any number
 * of times (with the same or changed inputs); each generation replaces the result. */
typedef struct massv_request massv_request;

/*
 * Creates a request for `prompt` (UTF-8; "" is allowed) with no image and default
 * parameters. The prompt is the text of one user turn; massv applies the model's chat
 * template and puts the image, if any, before the text.
 *
 * Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT or MASSV_ERR_INTERNAL. *out_request is
 * NULL on failure. The caller owns the request and releases it with massv_request_free().
 */
massv_status massv_request_create(const char *prompt, massv_request **out_request);

/* Frees *request and sets *request to NULL; NULL or *request == NULL is a no-op, so
 * freeing twice through the same variable is safe.
 * Free a request only when no call is using it. As a safety net, while a call is using
 * the request (e.g. from its own token callback) this call does nothing and leaves
 * *request unchanged; do not rely on it to synchronise threads. */
void massv_request_free(massv_request **request);

/* Replaces the prompt (UTF-8). Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT, MASSV_ERR_BUSY. */
massv_status massv_request_set_prompt(massv_request *request, const char *prompt);

/*
 * Sets the generation parameters (copied). Checks what can be checked without an engine:
 * draft_mode is a massv_draft_mode, temperature is finite and >= 0, top_p in (0, 1],
 * 1 <= max_new_tokens <= 2^30, gamma <= 2^30. Whether gamma suits the drafter and the
 * output fits the model's context is checked by massv_generate().
 * Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT (parameters unchanged) or MASSV_ERR_BUSY.
 */
massv_status massv_request_set_params(massv_request *request, const massv_generate_params *params);

/*
 * Drafts token trees instead of chains of gamma: spec is `massv generate --tree`'s syntax
 * (static:<paths> such as "0;1;0.0;0.1;0.0.0", static:<w1>x<w2>x... such as "8x1x1x1x1",
 * or dynamic:<nodes>,<depth>[,<width>]); NULL goes back to chains. Kept across
 * massv_request_set_params(). Needs an engine with a drafter at generation time.
 * Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT (malformed spec; the shape is unchanged)
 * or MASSV_ERR_BUSY.
 */
massv_status massv_request_set_tree(massv_request *request, const char *spec);

/*
 * Sets the image shown before the prompt, replacing any previous one. The image is read
 * and decoded now (PNG, JPEG or WebP, format sniffed from the content; EXIF orientation
 * applied; alpha dropped) and kept decoded in the request, so errors surface here. On
 * failure the request's previous image is kept.
 *
 * massv_request_set_image_file:    a file path.
 * massv_request_set_image_encoded: the bytes of an encoded file in memory; size >= 1.
 * massv_request_set_image_rgb8:    raw pixels, 8-bit R,G,B interleaved, rows top to
 *     bottom; `stride` is the distance in bytes between the starts of two rows (0 means
 *     tightly packed, width * 3; otherwise it must be >= width * 3). The buffer must hold
 *     (height - 1) * stride + width * 3 bytes. width, height >= 1.
 *
 * Return MASSV_OK, MASSV_ERR_INVALID_ARGUMENT (NULL, zero size), MASSV_ERR_IMAGE,
 * MASSV_ERR_BUSY or MASSV_ERR_INTERNAL. Whether the target can see images is checked by
 * massv_generate() (MASSV_ERR_INVALID_ARGUMENT for a text-only target).
 */
massv_status massv_request_set_image_file(massv_request *request, const char *path);
massv_status massv_request_set_image_encoded(massv_request *request, const void *data, size_t size);
massv_status massv_request_set_image_rgb8(massv_request *request, const uint8_t *pixels, size_t width,
                                          size_t height, size_t stride);

/* Removes the image (a text-only prompt). Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT, MASSV_ERR_BUSY. */
massv_status massv_request_clear_image(massv_request *request);

/* ======================================================================================
 * Generation
 * ====================================================================================== */

/*
 * Called once per generated token, in order, on the thread that called massv_generate().
 *
 *   token      The token id.
 *   piece      The text this token completes, NUL-terminated UTF-8; "" when the token
 *              only starts a multi-byte character (its text arrives with a later token)
 *              and for the final stop token. Concatenating the pieces gives the answer
 *              of massv_request_text(), except when the answer ends in an incomplete
 *              character (shown there as U+FFFD, never streamed).
 *              Valid only during the call: copy it to keep it.
 *   piece_len  strlen(piece), unless the text contains U+0000 (then use piece_len).
 *   user_data  The pointer given to massv_generate().
 *
 * Return 0 to go on, non-zero to stop: the token just delivered is the last one and
 * massv_generate() returns MASSV_OK with the tokens so far (finish_reason
 * MASSV_FINISH_CALLBACK). The callback must not throw C++ exceptions or longjmp out
 * (massv's frames are in between). It may call massv: other requests and the engine are
 * fine (even a nested massv_generate with another request); calls on the request being
 * generated fail with MASSV_ERR_BUSY; freeing that request or the engine is refused
 * (see the *_free functions).
 */
typedef int (*massv_token_callback)(uint32_t token, const char *piece, size_t piece_len, void *user_data);

/*
 * Generates the answer to `request` with `engine`, streaming tokens to `callback` (NULL:
 * no streaming). Blocks until done. The result (text, tokens, metrics) is stored in the
 * request, replacing the previous one; read it with massv_request_text/tokens/metrics().
 * The engine is only read: other threads may generate with it at the same time.
 *
 * Returns MASSV_OK (also when the callback stopped generation),
 * MASSV_ERR_INVALID_ARGUMENT (NULL handles; parameters the engine rejects, e.g. gamma 0
 * with a drafter, a draft mode without a drafter or MASSV mode with a text drafter; an
 * image for a text-only target; a prompt plus max_new_tokens beyond the model's context),
 * MASSV_ERR_IMAGE (the image cannot be preprocessed), MASSV_ERR_DEVICE (a CUDA operation
 * failed, e.g. out of device memory), MASSV_ERR_GENERATION,
 * MASSV_ERR_BUSY (the request is in use; it is left untouched) or MASSV_ERR_INTERNAL.
 * On any other failure the request holds no result.
 */
massv_status massv_generate(const massv_engine *engine, massv_request *request, massv_token_callback callback,
                            void *user_data);

/*
 * massv_generate() without a callback, then massv_request_text(request, buf, buf_size,
 * text_len): one call for "the answer into my buffer". When it returns
 * MASSV_ERR_BUFFER_TOO_SMALL the generation did succeed; fetch the whole text with
 * massv_request_text() and a buffer of *text_len + 1 bytes, without generating again.
 */
massv_status massv_generate_text(const massv_engine *engine, massv_request *request, char *buf, size_t buf_size,
                                 size_t *text_len);

/* ======================================================================================
 * Results of the last successful generation on a request
 * ====================================================================================== */

/*
 * Copies the answer (UTF-8, without the stop token) into buf as a NUL-terminated string.
 *
 *   buf, buf_size  Caller buffer and its size in bytes; (NULL, 0) only queries the length
 *                  (and returns MASSV_ERR_BUFFER_TOO_SMALL: even "" needs its NUL).
 *   text_len       Optional (may be NULL): receives the answer's length in bytes, without
 *                  the terminating NUL — like snprintf's return value. A buffer of
 *                  *text_len + 1 bytes always fits.
 *
 * If the answer does not fit, buf receives the longest prefix that fits and ends at a
 * whole UTF-8 character, NUL-terminated (when buf_size >= 1), and the call returns
 * MASSV_ERR_BUFFER_TOO_SMALL. Otherwise MASSV_OK; MASSV_ERR_INVALID_ARGUMENT when the
 * request is NULL or has no result; MASSV_ERR_BUSY.
 */
massv_status massv_request_text(const massv_request *request, char *buf, size_t buf_size, size_t *text_len);

/*
 * Copies the generated token ids (in order; a final stop token included) into buf, which
 * holds `cap` ids. *n_tokens (optional) receives their number. Returns MASSV_OK, or
 * MASSV_ERR_BUFFER_TOO_SMALL after copying the first `cap`; (NULL, 0) queries the count
 * (and so returns MASSV_ERR_BUFFER_TOO_SMALL, as there is always at least one token).
 * MASSV_ERR_INVALID_ARGUMENT when the request is NULL or has no result; MASSV_ERR_BUSY.
 */
massv_status massv_request_tokens(const massv_request *request, uint32_t *buf, size_t cap, size_t *n_tokens);

/* Wall time of each stage of a generation, in milliseconds (names as in `massv generate --json`). */
typedef struct massv_timings {
    double vision;         /* vision tower over the image */
    double prefill_target; /* target over the prompt */
    double prefill_draft;  /* drafter over the prompt (0 without a drafter) */
    double draft;          /* drafting, all passes */
    double verify;         /* target verification passes */
    double accept;         /* acceptance rule and cache bookkeeping */
    double total;          /* the whole generation */
} massv_timings;

typedef enum massv_finish_reason {
    MASSV_FINISH_NONE = 0,       /* never reported by a successful generation */
    MASSV_FINISH_STOP_TOKEN = 1, /* the model emitted a stop token (it is the last token) */
    MASSV_FINISH_MAX_TOKENS = 2, /* max_new_tokens were generated */
    MASSV_FINISH_CALLBACK = 3    /* the token callback asked to stop */
} massv_finish_reason;

typedef struct massv_metrics {
    /* Mean accepted length: tokens emitted per target verification pass, the bonus token
     * included (1.0 without a drafter; 0 when no pass ran). Up to gamma + 1. */
    double mal;
    /* Tokens emitted by the decode loop per second of its wall time. */
    double tokens_per_s;
    massv_timings timings_ms;
    /* Target verification passes (the prefill not counted). */
    size_t target_passes;
    /* Tokens generated, the final stop token included. */
    size_t generated_tokens;
    /* The gamma used (0 without a drafter; the tree's depth with token trees). */
    size_t gamma;
    /* Number of entries of the acceptance-by-position array (at most gamma). */
    size_t n_accept_rate_by_pos;
    /* A massv_finish_reason value. */
    int finish_reason;
    /* Mean drafted nodes per target pass with token trees (0 with chains). */
    double tree_nodes;
} massv_metrics;

/*
 * Fills *out with the metrics of the last generation, and copies the acceptance rate by
 * draft position (entry i: the fraction of the passes that drafted position i in which
 * draft i was accepted) into accept_rate_by_pos, at most `cap` entries. The number of
 * entries is out->n_accept_rate_by_pos; entries beyond `cap` are not copied (this is not
 * an error: an array of gamma entries always suffices). accept_rate_by_pos may be NULL
 * when cap is 0.
 *
 * Returns MASSV_OK, MASSV_ERR_INVALID_ARGUMENT (NULL request/out, no result), MASSV_ERR_BUSY.
 */
massv_status massv_request_metrics(const massv_request *request, massv_metrics *out, double *accept_rate_by_pos,
                                   size_t cap);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MASSV_H */
