/*
 * api_test.c — the C API's contract, exercised from C through the real library:
 * NULL arguments, invalid UTF-8, zero-length and too-small buffers, a callback that stops,
 * a callback touching its own request, double frees, one engine shared by several threads,
 * one request raced by two threads, thread-local errors.
 *
 *   api_test VL_TARGET_DIR IMAGE TEXT_TARGET_DIR
 *
 * Prints "ok N - what" per check; the first failed check prints "not ok" and exits 1.
 * Run by ffi/tests/c_api.rs and, under valgrind, by ffi/valgrind.sh.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "massv.h"

static int n_checks = 0;

#define CHECK(cond, what)                                                                                      \
    do {                                                                                                       \
        n_checks++;                                                                                            \
        if (!(cond)) {                                                                                         \
            printf("not ok %d - %s (%s:%d: %s; last error: %s)\n", n_checks, what, __FILE__, __LINE__, #cond, \
                   massv_last_error());                                                                        \
            exit(1);                                                                                           \
        }                                                                                                      \
        printf("ok %d - %s\n", n_checks, what);                                                                \
    } while (0)

#define CHECK_STATUS(expr, want, what) CHECK((expr) == (want), what)

#define MAX_TOKENS 12

static const char *vl_dir, *image_path, *text_dir;
static massv_engine *vl_engine;

/* Generates `prompt` about the test image with `engine`; copies the tokens. */
static massv_status generate_tokens(massv_engine *engine, const char *prompt, uint32_t *tokens, size_t *n) {
    massv_request *req = NULL;
    massv_generate_params p = massv_generate_default_params();
    massv_status st;
    p.max_new_tokens = MAX_TOKENS;
    if ((st = massv_request_create(prompt, &req)) != MASSV_OK) return st;
    if ((st = massv_request_set_params(req, &p)) == MASSV_OK && (st = massv_request_set_image_file(req, image_path)) == MASSV_OK &&
        (st = massv_generate(engine, req, NULL, NULL)) == MASSV_OK)
        st = massv_request_tokens(req, tokens, MAX_TOKENS, n);
    massv_request_free(&req);
    return st;
}

/* ---------------------------------------------------------------------------------------- */

static void test_version_and_defaults(void) {
    massv_generate_params p = massv_generate_default_params();
    CHECK(massv_version() != NULL && strlen(massv_version()) > 0, "massv_version is a non-empty string");
    CHECK(p.gamma == 5 && p.temperature == 0.0f && p.top_k == 0 && p.top_p == 1.0f && p.seed == 0 &&
              p.max_new_tokens == 128 && p.draft_mode == MASSV_DRAFT_MODE_AUTO,
          "default params are the CLI's");
    CHECK(strcmp(massv_status_name(MASSV_ERR_IMAGE), "MASSV_ERR_IMAGE") == 0 &&
              strcmp(massv_status_name(12345), "MASSV_ERR_UNKNOWN") == 0,
          "status names");
}

static void test_null_arguments(void) {
    massv_engine *e = (massv_engine *)&n_checks; /* garbage: must be overwritten with NULL */
    massv_request *r = NULL;
    massv_metrics m;
    size_t n = 0;
    char buf[8];

    CHECK_STATUS(massv_engine_load(NULL, NULL, NULL, &e), MASSV_ERR_INVALID_ARGUMENT, "load: NULL target_dir");
    CHECK(e == NULL, "load: failure sets *out_engine to NULL");
    CHECK(strstr(massv_last_error(), "target_dir") != NULL, "load: the message names the argument");
    CHECK_STATUS(massv_engine_load(vl_dir, NULL, NULL, NULL), MASSV_ERR_INVALID_ARGUMENT, "load: NULL out_engine");
    CHECK_STATUS(massv_engine_load("", NULL, NULL, &e), MASSV_ERR_INVALID_ARGUMENT, "load: empty target_dir");
    CHECK_STATUS(massv_request_create(NULL, &r), MASSV_ERR_INVALID_ARGUMENT, "request_create: NULL prompt");
    CHECK_STATUS(massv_request_create("hi", NULL), MASSV_ERR_INVALID_ARGUMENT, "request_create: NULL out");
    CHECK_STATUS(massv_request_set_prompt(NULL, "x"), MASSV_ERR_INVALID_ARGUMENT, "set_prompt: NULL request");
    CHECK_STATUS(massv_request_set_params(NULL, NULL), MASSV_ERR_INVALID_ARGUMENT, "set_params: NULL request");
    CHECK_STATUS(massv_request_set_image_file(NULL, image_path), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_file: NULL request");
    CHECK_STATUS(massv_request_set_image_encoded(NULL, buf, 1), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_encoded: NULL request");
    CHECK_STATUS(massv_request_set_image_rgb8(NULL, (const uint8_t *)buf, 1, 1, 0), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_rgb8: NULL request");
    CHECK_STATUS(massv_request_clear_image(NULL), MASSV_ERR_INVALID_ARGUMENT, "clear_image: NULL request");
    CHECK_STATUS(massv_generate(NULL, NULL, NULL, NULL), MASSV_ERR_INVALID_ARGUMENT, "generate: NULL engine");
    CHECK_STATUS(massv_generate(vl_engine, NULL, NULL, NULL), MASSV_ERR_INVALID_ARGUMENT, "generate: NULL request");
    CHECK_STATUS(massv_generate_text(vl_engine, NULL, buf, sizeof buf, &n), MASSV_ERR_INVALID_ARGUMENT,
                 "generate_text: NULL request");
    CHECK_STATUS(massv_request_text(NULL, buf, sizeof buf, &n), MASSV_ERR_INVALID_ARGUMENT, "text: NULL request");
    CHECK_STATUS(massv_request_tokens(NULL, NULL, 0, &n), MASSV_ERR_INVALID_ARGUMENT, "tokens: NULL request");
    CHECK_STATUS(massv_request_metrics(NULL, &m, NULL, 0), MASSV_ERR_INVALID_ARGUMENT, "metrics: NULL request");
    CHECK(massv_engine_has_drafter(NULL) == 0, "has_drafter(NULL) is 0");

    CHECK_STATUS(massv_request_create("hi", &r), MASSV_OK, "request_create");
    CHECK(strcmp(massv_last_error(), "") == 0, "success clears the last error");
    CHECK_STATUS(massv_request_set_prompt(r, NULL), MASSV_ERR_INVALID_ARGUMENT, "set_prompt: NULL prompt");
    CHECK_STATUS(massv_request_set_params(r, NULL), MASSV_ERR_INVALID_ARGUMENT, "set_params: NULL params");
    CHECK_STATUS(massv_request_set_image_file(r, NULL), MASSV_ERR_INVALID_ARGUMENT, "set_image_file: NULL path");
    CHECK_STATUS(massv_request_set_image_encoded(r, NULL, 10), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_encoded: NULL data");
    CHECK_STATUS(massv_request_set_image_rgb8(r, NULL, 1, 1, 0), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_rgb8: NULL pixels");
    CHECK_STATUS(massv_request_text(r, buf, sizeof buf, &n), MASSV_ERR_INVALID_ARGUMENT,
                 "text: no result before generating");
    CHECK_STATUS(massv_request_metrics(r, NULL, NULL, 0), MASSV_ERR_INVALID_ARGUMENT, "metrics: NULL out");
    massv_request_free(&r);
    CHECK(r == NULL, "request_free nulls the handle");
    massv_request_free(&r);
    massv_request_free(NULL);
    CHECK(1, "request_free twice through the same variable, and of NULL, is a no-op");
    massv_engine_free(NULL);
    CHECK(1, "engine_free(NULL) is a no-op");
}

static void test_load_errors(void) {
    massv_engine *e = NULL;
    CHECK_STATUS(massv_engine_load(vl_dir, NULL, "tpu", &e), MASSV_ERR_INVALID_ARGUMENT, "load: unknown device");
    /* MASSV_TEST_CUDA=1 (set by the Rust harness where a GPU serves the fixture): "cuda"
     * loads; otherwise it is a device error that leaves no engine. */
    const char *cuda = getenv("MASSV_TEST_CUDA");
    if (cuda != NULL && strcmp(cuda, "1") == 0) {
        CHECK_STATUS(massv_engine_load(vl_dir, NULL, "cuda", &e), MASSV_OK, "load: cuda where a GPU serves the target");
        CHECK(e != NULL, "load: an engine on the GPU");
        massv_engine_free(&e);
    } else {
        CHECK_STATUS(massv_engine_load(vl_dir, NULL, "cuda", &e), MASSV_ERR_DEVICE, "load: cuda is unavailable");
        CHECK(e == NULL, "load: no engine after a device error");
    }
    CHECK_STATUS(massv_engine_load("/nonexistent/massv-model", NULL, "cpu", &e), MASSV_ERR_LOAD,
                 "load: missing directory");
    CHECK(strstr(massv_last_error(), "/nonexistent/massv-model") != NULL, "load: the message names the directory");
    CHECK_STATUS(massv_engine_load(vl_dir, "/nonexistent/drafter", "CPU", &e), MASSV_ERR_LOAD,
                 "load: missing drafter directory");
    CHECK_STATUS(massv_engine_load(text_dir, NULL, "cpu", &e), MASSV_OK, "load: a text-only target");
    CHECK(massv_engine_has_drafter(e) == 0, "has_drafter is 0 without a drafter");
    massv_engine_free(&e);
    CHECK(e == NULL, "engine_free nulls the handle");
    massv_engine_free(&e);
    CHECK(1, "engine_free twice through the same variable is a no-op");
}

static void test_invalid_inputs(void) {
    massv_request *r = NULL;
    massv_engine *text = NULL;
    massv_generate_params p = massv_generate_default_params();
    const char bad_utf8[] = {'h', 'i', (char)0xff, (char)0xfe, 0};
    const unsigned char not_an_image[] = "certainly not a PNG";
    const uint8_t pixels[2 * 2 * 3] = {0};

    CHECK_STATUS(massv_request_create(bad_utf8, &r), MASSV_ERR_INVALID_ARGUMENT, "request_create: invalid UTF-8");
    CHECK(r == NULL && strstr(massv_last_error(), "UTF-8") != NULL, "request_create: says UTF-8");
    CHECK_STATUS(massv_request_create("ok", &r), MASSV_OK, "request_create");
    CHECK_STATUS(massv_request_set_prompt(r, bad_utf8), MASSV_ERR_INVALID_ARGUMENT, "set_prompt: invalid UTF-8");
    CHECK_STATUS(massv_engine_load(text_dir, NULL, bad_utf8, &text), MASSV_ERR_INVALID_ARGUMENT,
                 "load: invalid UTF-8 device");

    CHECK_STATUS(massv_request_set_image_encoded(r, not_an_image, 0), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_encoded: zero-length buffer");
    CHECK_STATUS(massv_request_set_image_encoded(r, not_an_image, sizeof not_an_image), MASSV_ERR_IMAGE,
                 "set_image_encoded: not an image");
    CHECK_STATUS(massv_request_set_image_file(r, "/nonexistent/cat.png"), MASSV_ERR_IMAGE,
                 "set_image_file: missing file");
    CHECK_STATUS(massv_request_set_image_rgb8(r, pixels, 0, 2, 0), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_rgb8: zero width");
    CHECK_STATUS(massv_request_set_image_rgb8(r, pixels, 2, 0, 0), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_rgb8: zero height");
    CHECK_STATUS(massv_request_set_image_rgb8(r, pixels, 2, 2, 5), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_rgb8: stride below width*3");
    CHECK_STATUS(massv_request_set_image_rgb8(r, pixels, (size_t)-1, 2, 0), MASSV_ERR_INVALID_ARGUMENT,
                 "set_image_rgb8: overflowing size");
    CHECK_STATUS(massv_request_set_image_rgb8(r, pixels, 2, 2, 6), MASSV_OK, "set_image_rgb8: 2x2");

    p.top_p = 0.0f;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_ERR_INVALID_ARGUMENT, "set_params: top_p 0");
    p = massv_generate_default_params();
    p.temperature = -1.0f;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_ERR_INVALID_ARGUMENT, "set_params: negative temperature");
    p = massv_generate_default_params();
    p.max_new_tokens = 0;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_ERR_INVALID_ARGUMENT, "set_params: max_new_tokens 0");
    p = massv_generate_default_params();
    p.draft_mode = 7;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_ERR_INVALID_ARGUMENT, "set_params: unknown draft mode");
    p = massv_generate_default_params();
    p.max_new_tokens = (size_t)-1;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_ERR_INVALID_ARGUMENT, "set_params: huge max_new_tokens");
    p = massv_generate_default_params();
    p.draft_mode = MASSV_DRAFT_MODE_TEXT;
    p.max_new_tokens = 4;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_OK, "set_params: text draft mode");
    CHECK_STATUS(massv_generate(vl_engine, r, NULL, NULL), MASSV_ERR_INVALID_ARGUMENT,
                 "generate: a draft mode without a drafter");
    p.draft_mode = MASSV_DRAFT_MODE_AUTO;
    p.max_new_tokens = 100000;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_OK, "set_params: 100000 tokens");
    CHECK_STATUS(massv_generate(vl_engine, r, NULL, NULL), MASSV_ERR_INVALID_ARGUMENT,
                 "generate: beyond the context");

    CHECK_STATUS(massv_engine_load(text_dir, NULL, "cpu", &text), MASSV_OK, "load: text-only target");
    p.max_new_tokens = 4;
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_OK, "set_params: 4 tokens");
    CHECK_STATUS(massv_generate(text, r, NULL, NULL), MASSV_ERR_INVALID_ARGUMENT,
                 "generate: an image for a text-only target");
    CHECK_STATUS(massv_request_clear_image(r), MASSV_OK, "clear_image");
    CHECK_STATUS(massv_generate(text, r, NULL, NULL), MASSV_OK, "generate: text-only prompt");
    massv_engine_free(&text);
    massv_request_free(&r);
}

/* ---------------------------------------------------------------------------------------- */

struct stop_state {
    int calls, stop_after;
    massv_request *self;
    massv_status self_text, self_prompt, nested;
    size_t streamed;
};

static int stop_cb(uint32_t token, const char *piece, size_t piece_len, void *user_data) {
    struct stop_state *s = (struct stop_state *)user_data;
    char buf[4];
    (void)token;
    s->calls++;
    s->streamed += piece_len;
    if (piece == NULL || strlen(piece) > piece_len) s->calls = -1000; /* NUL-terminated, not longer */
    if (s->self) {
        massv_request *req = s->self, *other = NULL;
        massv_engine *engine = vl_engine;
        s->self_text = massv_request_text(s->self, buf, sizeof buf, NULL);
        s->self_prompt = massv_request_set_prompt(s->self, "changed");
        /* Freeing what is being generated is refused: the handles stay as they are. */
        massv_request_free(&req);
        massv_engine_free(&engine);
        if (req != s->self || engine != vl_engine) s->calls = -1000;
        /* A nested generation with another request on the same engine is fine. */
        if (s->calls == 1) {
            s->nested = massv_request_create("nested", &other);
            if (s->nested == MASSV_OK) s->nested = massv_generate(vl_engine, other, NULL, NULL);
            massv_request_free(&other);
        }
    }
    return s->calls >= s->stop_after;
}

static void test_callback(void) {
    massv_request *r = NULL;
    massv_generate_params p = massv_generate_default_params();
    struct stop_state s;
    massv_metrics m;
    uint32_t tokens[MAX_TOKENS];
    size_t n = 0, len = 0;

    p.max_new_tokens = MAX_TOKENS;
    CHECK_STATUS(massv_request_create("Describe the image.", &r), MASSV_OK, "request_create");
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_OK, "set_params");
    CHECK_STATUS(massv_request_set_image_file(r, image_path), MASSV_OK, "set_image_file");

    memset(&s, 0, sizeof s);
    s.stop_after = 3;
    CHECK_STATUS(massv_generate(vl_engine, r, stop_cb, &s), MASSV_OK, "generate: a callback that stops is MASSV_OK");
    CHECK(s.calls == 3, "the callback ran exactly 3 times, NUL-terminated pieces");
    CHECK_STATUS(massv_request_tokens(r, tokens, MAX_TOKENS, &n), MASSV_OK, "tokens");
    CHECK(n == 3, "generation stopped after the third token");
    CHECK_STATUS(massv_request_metrics(r, &m, NULL, 0), MASSV_OK, "metrics with no acceptance array");
    CHECK(m.finish_reason == MASSV_FINISH_CALLBACK && m.generated_tokens == 3, "finish_reason is CALLBACK");
    CHECK_STATUS(massv_request_text(r, NULL, 0, &len), MASSV_ERR_BUFFER_TOO_SMALL, "text: length query");
    CHECK(len >= s.streamed, "the streamed pieces are no longer than the text");

    memset(&s, 0, sizeof s);
    s.stop_after = 1000;
    s.self = r;
    CHECK_STATUS(massv_generate(vl_engine, r, stop_cb, &s), MASSV_OK, "generate: callback touching its request");
    CHECK(s.calls == MAX_TOKENS, "the callback saw every token; freeing its request or engine was refused");
    CHECK(s.self_text == MASSV_ERR_BUSY && s.self_prompt == MASSV_ERR_BUSY,
          "calls on the request from its own callback are MASSV_ERR_BUSY, not a deadlock");
    CHECK(s.nested == MASSV_OK, "a callback may generate with another request on the same engine");
    CHECK_STATUS(massv_request_metrics(r, &m, NULL, 0), MASSV_OK, "metrics");
    CHECK(m.finish_reason == MASSV_FINISH_MAX_TOKENS && m.generated_tokens == MAX_TOKENS && m.mal == 1.0 &&
              m.gamma == 0 && m.n_accept_rate_by_pos == 0 && m.target_passes == MAX_TOKENS - 1,
          "metrics of plain decoding");
    CHECK(m.timings_ms.total > 0.0 && m.timings_ms.vision > 0.0 && m.tokens_per_s > 0.0, "timings are filled");
    massv_request_free(&r);
}

static void test_buffers(void) {
    massv_request *r = NULL;
    massv_generate_params p = massv_generate_default_params();
    char small[5], *full;
    uint32_t tokens[MAX_TOKENS] = {0}, two[2] = {0};
    size_t len = 0, n = 0, cut;

    p.max_new_tokens = MAX_TOKENS;
    CHECK_STATUS(massv_request_create("Describe the image.", &r), MASSV_OK, "request_create");
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_OK, "set_params");
    CHECK_STATUS(massv_request_set_image_file(r, image_path), MASSV_OK, "set_image_file");
    CHECK_STATUS(massv_generate_text(vl_engine, r, NULL, 1, &len), MASSV_ERR_INVALID_ARGUMENT,
                 "generate_text: NULL buffer with a size");
    memset(small, 'x', sizeof small);
    CHECK_STATUS(massv_generate_text(vl_engine, r, small, sizeof small, &len), MASSV_ERR_BUFFER_TOO_SMALL,
                 "generate_text: small buffer");
    CHECK(len >= sizeof small, "generate_text: the full length is reported");
    full = (char *)malloc(len + 1);
    CHECK(full != NULL, "malloc");
    CHECK_STATUS(massv_request_text(r, full, len + 1, &n), MASSV_OK, "text: a buffer of len + 1 fits");
    CHECK(n == len && full[len] == '\0', "text: NUL-terminated, same length");
    cut = strlen(small);
    CHECK(cut < sizeof small && memcmp(small, full, cut) == 0, "truncated copy is a NUL-terminated prefix");
    CHECK(((unsigned char)full[cut] & 0xC0) != 0x80, "truncated at a UTF-8 character boundary");
    CHECK_STATUS(massv_request_text(r, full, len, NULL), MASSV_ERR_BUFFER_TOO_SMALL,
                 "text: len bytes (no room for the NUL) is too small");
    CHECK_STATUS(massv_request_text(r, small, 0, NULL), MASSV_ERR_BUFFER_TOO_SMALL, "text: zero-size buffer");
    CHECK_STATUS(massv_request_text(r, NULL, 3, NULL), MASSV_ERR_INVALID_ARGUMENT, "text: NULL buffer with a size");
    free(full);

    CHECK_STATUS(massv_request_tokens(r, NULL, 0, &n), MASSV_ERR_BUFFER_TOO_SMALL, "tokens: count query");
    CHECK(n == MAX_TOKENS, "tokens: count");
    CHECK_STATUS(massv_request_tokens(r, two, 2, &n), MASSV_ERR_BUFFER_TOO_SMALL, "tokens: small buffer");
    CHECK_STATUS(massv_request_tokens(r, tokens, MAX_TOKENS, NULL), MASSV_OK, "tokens: exact buffer");
    CHECK(two[0] == tokens[0] && two[1] == tokens[1], "tokens: the small buffer got the first ones");
    CHECK_STATUS(massv_request_tokens(r, NULL, 2, &n), MASSV_ERR_INVALID_ARGUMENT, "tokens: NULL with a size");
    massv_request_free(&r);
}

static void test_image_sources(void) {
    uint32_t a[MAX_TOKENS], b[MAX_TOKENS];
    size_t na = 0, nb = 0, size = 0;
    unsigned char *bytes;
    long len;
    FILE *f = fopen(image_path, "rb");
    massv_request *r = NULL;
    massv_generate_params p = massv_generate_default_params();

    CHECK(f != NULL, "open the image");
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    bytes = (unsigned char *)malloc((size_t)len);
    size = fread(bytes, 1, (size_t)len, f);
    fclose(f);
    CHECK(size == (size_t)len && size > 0, "read the image");

    CHECK_STATUS(generate_tokens(vl_engine, "Describe the image.", a, &na), MASSV_OK, "generate from a file");
    p.max_new_tokens = MAX_TOKENS;
    CHECK_STATUS(massv_request_create("Describe the image.", &r), MASSV_OK, "request_create");
    CHECK_STATUS(massv_request_set_params(r, &p), MASSV_OK, "set_params");
    CHECK_STATUS(massv_request_set_image_encoded(r, bytes, size), MASSV_OK, "set_image_encoded");
    memset(bytes, 0, size); /* massv copied what it needed */
    free(bytes);
    CHECK_STATUS(massv_request_set_image_encoded(r, "junk", 4), MASSV_ERR_IMAGE, "a failed set keeps the old image");
    CHECK_STATUS(massv_generate(vl_engine, r, NULL, NULL), MASSV_OK, "generate from memory");
    CHECK_STATUS(massv_request_tokens(r, b, MAX_TOKENS, &nb), MASSV_OK, "tokens");
    CHECK(na == nb && memcmp(a, b, na * sizeof *a) == 0, "file and in-memory image give the same tokens");
    CHECK_STATUS(massv_request_clear_image(r), MASSV_OK, "clear_image");
    CHECK_STATUS(massv_generate(vl_engine, r, NULL, NULL), MASSV_OK, "generate without the image");
    CHECK_STATUS(massv_request_tokens(r, b, MAX_TOKENS, &nb), MASSV_OK, "tokens");
    CHECK(na != nb || memcmp(a, b, na * sizeof *a) != 0, "the image changes the answer");
    massv_request_free(&r);
}

/* ---------------------------------------------------------------------------------------- */

#define N_THREADS 4

struct worker {
    pthread_t thread;
    uint32_t tokens[MAX_TOKENS];
    size_t n;
    massv_status st;
};

static void *worker_main(void *arg) {
    struct worker *w = (struct worker *)arg;
    w->st = generate_tokens(vl_engine, "Describe the image.", w->tokens, &w->n);
    return NULL;
}

static void test_shared_engine(void) {
    struct worker w[N_THREADS];
    uint32_t want[MAX_TOKENS];
    size_t n_want = 0;
    int i, same = 1;

    CHECK_STATUS(generate_tokens(vl_engine, "Describe the image.", want, &n_want), MASSV_OK, "single-thread reference");
    for (i = 0; i < N_THREADS; i++) CHECK(pthread_create(&w[i].thread, NULL, worker_main, &w[i]) == 0, "spawn");
    for (i = 0; i < N_THREADS; i++) {
        pthread_join(w[i].thread, NULL);
        same = same && w[i].st == MASSV_OK && w[i].n == n_want && memcmp(w[i].tokens, want, n_want * 4) == 0;
    }
    CHECK(same, "4 threads generating on one engine at once get the single-thread tokens");
}

/* One request, two threads: the second gets MASSV_ERR_BUSY while the first generates. */
struct race {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int in_callback, tried;
    massv_request *req;
    massv_status generate_st;
};

static int race_cb(uint32_t token, const char *piece, size_t piece_len, void *user_data) {
    struct race *r = (struct race *)user_data;
    (void)token, (void)piece, (void)piece_len;
    pthread_mutex_lock(&r->mu);
    r->in_callback = 1;
    pthread_cond_broadcast(&r->cv);
    while (!r->tried) pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    return 1;
}

static void *race_main(void *arg) {
    struct race *r = (struct race *)arg;
    r->generate_st = massv_generate(vl_engine, r->req, race_cb, r);
    return NULL;
}

static void test_request_race(void) {
    struct race r;
    pthread_t t;
    massv_status during;
    memset(&r, 0, sizeof r);
    pthread_mutex_init(&r.mu, NULL);
    pthread_cond_init(&r.cv, NULL);
    CHECK_STATUS(massv_request_create("Describe the image.", &r.req), MASSV_OK, "request_create");
    CHECK(pthread_create(&t, NULL, race_main, &r) == 0, "spawn the generating thread");
    pthread_mutex_lock(&r.mu);
    while (!r.in_callback) pthread_cond_wait(&r.cv, &r.mu);
    pthread_mutex_unlock(&r.mu);
    during = massv_request_set_prompt(r.req, "another prompt");
    CHECK(strstr(massv_last_error(), "in use") != NULL || during == MASSV_OK, "busy message");
    pthread_mutex_lock(&r.mu);
    r.tried = 1;
    pthread_cond_broadcast(&r.cv);
    pthread_mutex_unlock(&r.mu);
    pthread_join(t, NULL);
    CHECK(during == MASSV_ERR_BUSY, "a request used by another thread answers MASSV_ERR_BUSY");
    CHECK(r.generate_st == MASSV_OK, "the generating thread finished normally");
    CHECK_STATUS(massv_request_set_prompt(r.req, "another prompt"), MASSV_OK, "the request is usable afterwards");
    massv_request_free(&r.req);
    pthread_cond_destroy(&r.cv);
    pthread_mutex_destroy(&r.mu);
}

/* massv_last_error is per thread. */
static void *succeed_main(void *arg) {
    massv_request *r = NULL;
    int *ok = (int *)arg;
    *ok = strcmp(massv_last_error(), "") == 0; /* nothing failed on this thread */
    *ok = *ok && massv_request_create("x", &r) == MASSV_OK;
    massv_request_free(&r);
    return NULL;
}

static void test_thread_local_errors(void) {
    massv_request *r = NULL;
    pthread_t t;
    int ok = 0;
    char before[256];
    CHECK_STATUS(massv_request_create(NULL, &r), MASSV_ERR_INVALID_ARGUMENT, "fail on the main thread");
    snprintf(before, sizeof before, "%s", massv_last_error());
    CHECK(pthread_create(&t, NULL, succeed_main, &ok) == 0, "spawn");
    pthread_join(t, NULL);
    CHECK(ok, "another thread starts with an empty error and succeeds");
    CHECK(strcmp(before, massv_last_error()) == 0 && before[0] != '\0', "the main thread's error is untouched");
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: api_test VL_TARGET_DIR IMAGE TEXT_TARGET_DIR\n");
        return 2;
    }
    vl_dir = argv[1];
    image_path = argv[2];
    text_dir = argv[3];
    setvbuf(stdout, NULL, _IOLBF, 0);

    test_version_and_defaults();
    CHECK_STATUS(massv_engine_load(vl_dir, NULL, "cpu", &vl_engine), MASSV_OK, "load the VL target");
    test_null_arguments();
    test_load_errors();
    test_invalid_inputs();
    test_callback();
    test_buffers();
    test_image_sources();
    test_shared_engine();
    test_request_race();
    test_thread_local_errors();
    massv_engine_free(&vl_engine);
    printf("1..%d\nall %d checks passed\n", n_checks, n_checks);
    return 0;
}
