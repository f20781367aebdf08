/*
 * generate.c — answer a prompt about an image with massv, streaming the answer.
 *
 *   generate [options] TARGET_DIR [DRAFTER_DIR] IMAGE PROMPT
 *
 *   IMAGE                  PNG, JPEG or WebP file; "-" for a text-only prompt.
 *   --max-new-tokens N     (default 128)
 *   --gamma N              tokens drafted per pass (default 5)
 *   --temperature T        0 = greedy (default 0)
 *   --seed N               (default 0)
 *   --device D             auto | cpu | cuda (default auto)
 *   --image-from-memory    read the file and pass the encoded bytes, not the path
 *
 * The answer is streamed to stdout as it is generated, followed by a report:
 *
 *   tokens: 443 425 ...
 *   text_len: 27
 *   mal: 1.0000
 *   ...
 *
 * Build (see the README): cc -std=c99 generate.c -I ffi/include -L target/release -lmassv
 *                             -Wl,-rpath,target/release -o generate
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "massv.h"

static int fail(const char *what, massv_status st) {
    fprintf(stderr, "error: %s: %s (%s)\n", what, massv_last_error(), massv_status_name(st));
    return 1;
}

/* Streams each piece to stdout; never asks to stop. */
static int print_piece(uint32_t token, const char *piece, size_t piece_len, void *user_data) {
    size_t *n_streamed = (size_t *)user_data;
    (void)token;
    fwrite(piece, 1, piece_len, stdout);
    fflush(stdout);
    *n_streamed += piece_len;
    return 0;
}

/* Reads a whole file into a malloc'd buffer; NULL on failure. */
static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0) {
        buf = (unsigned char *)malloc((size_t)n);
        if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
            free(buf);
            buf = NULL;
        }
        *size = (size_t)n;
    }
    fclose(f);
    return buf;
}

static const char *finish_name(int reason) {
    switch (reason) {
    case MASSV_FINISH_STOP_TOKEN: return "stop_token";
    case MASSV_FINISH_MAX_TOKENS: return "max_tokens";
    case MASSV_FINISH_CALLBACK: return "callback";
    default: return "none";
    }
}

static int usage(void) {
    fprintf(stderr, "usage: generate [--max-new-tokens N] [--gamma N] [--temperature T] [--seed N] [--device D]\n"
                    "                [--image-from-memory] TARGET_DIR [DRAFTER_DIR] IMAGE|- PROMPT\n");
    return 2;
}

int main(int argc, char **argv) {
    massv_generate_params params = massv_generate_default_params();
    const char *device = "auto";
    const char *target, *drafter = NULL, *image, *prompt;
    int from_memory = 0, i = 1, rc = 1;
    massv_engine *engine = NULL;
    massv_request *req = NULL;
    massv_status st;
    massv_metrics m;
    double *accept = NULL;
    uint32_t *tokens = NULL;
    size_t n_tokens = 0, text_len = 0, n_streamed = 0, k;

    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        const char *opt = argv[i];
        if (strcmp(opt, "--image-from-memory") == 0) {
            from_memory = 1;
            continue;
        }
        if (i + 1 >= argc) return usage();
        if (strcmp(opt, "--max-new-tokens") == 0) params.max_new_tokens = (size_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(opt, "--gamma") == 0) params.gamma = (size_t)strtoul(argv[++i], NULL, 10);
        else if (strcmp(opt, "--temperature") == 0) params.temperature = strtof(argv[++i], NULL);
        else if (strcmp(opt, "--seed") == 0) params.seed = strtoull(argv[++i], NULL, 10);
        else if (strcmp(opt, "--device") == 0) device = argv[++i];
        else return usage();
    }
    if (argc - i == 3) {
        target = argv[i];
        image = argv[i + 1];
        prompt = argv[i + 2];
    } else if (argc - i == 4) {
        target = argv[i];
        drafter = argv[i + 1];
        image = argv[i + 2];
        prompt = argv[i + 3];
    } else {
        return usage();
    }

    fprintf(stderr, "massv %s\n", massv_version());
    if ((st = massv_engine_load(target, drafter, device, &engine)) != MASSV_OK) return fail("loading the models", st);
    if ((st = massv_request_create(prompt, &req)) != MASSV_OK) {
        fail("creating the request", st);
        goto done;
    }
    if ((st = massv_request_set_params(req, &params)) != MASSV_OK) {
        fail("setting the parameters", st);
        goto done;
    }
    if (strcmp(image, "-") != 0) {
        if (from_memory) {
            size_t size = 0;
            unsigned char *bytes = read_file(image, &size);
            if (!bytes) {
                fprintf(stderr, "error: cannot read %s\n", image);
                goto done;
            }
            st = massv_request_set_image_encoded(req, bytes, size);
            free(bytes); /* massv has decoded it: the buffer is ours to free at once */
        } else {
            st = massv_request_set_image_file(req, image);
        }
        if (st != MASSV_OK) {
            fail("reading the image", st);
            goto done;
        }
    }

    if ((st = massv_generate(engine, req, print_piece, &n_streamed)) != MASSV_OK) {
        fail("generating", st);
        goto done;
    }
    printf("\n");

    /* Ask for the count first, then copy: the snprintf pattern. */
    st = massv_request_tokens(req, NULL, 0, &n_tokens);
    if (st != MASSV_OK && st != MASSV_ERR_BUFFER_TOO_SMALL) {
        fail("reading the tokens", st);
        goto done;
    }
    tokens = (uint32_t *)malloc((n_tokens ? n_tokens : 1) * sizeof *tokens);
    if (!tokens || (st = massv_request_tokens(req, tokens, n_tokens, &n_tokens)) != MASSV_OK) {
        fail("reading the tokens", st);
        goto done;
    }
    printf("tokens:");
    for (k = 0; k < n_tokens; k++) printf(" %u", (unsigned)tokens[k]);
    printf("\n");

    st = massv_request_text(req, NULL, 0, &text_len);
    if (st != MASSV_OK && st != MASSV_ERR_BUFFER_TOO_SMALL) {
        fail("reading the text", st);
        goto done;
    }
    printf("text_len: %lu\nstreamed_len: %lu\n", (unsigned long)text_len, (unsigned long)n_streamed);

    accept = (double *)malloc((params.gamma ? params.gamma : 1) * sizeof *accept);
    if (!accept || (st = massv_request_metrics(req, &m, accept, params.gamma)) != MASSV_OK) {
        fail("reading the metrics", st);
        goto done;
    }
    printf("mal: %.6f\n", m.mal);
    printf("accept_rate_by_pos:");
    for (k = 0; k < m.n_accept_rate_by_pos && k < params.gamma; k++) printf(" %.6f", accept[k]);
    printf("\n");
    printf("target_passes: %lu\ngenerated_tokens: %lu\ngamma: %lu\n", (unsigned long)m.target_passes,
           (unsigned long)m.generated_tokens, (unsigned long)m.gamma);
    printf("finish_reason: %s\n", finish_name(m.finish_reason));
    printf("tokens_per_s: %.1f\n", m.tokens_per_s);
    printf("timings_ms: vision %.3f prefill_target %.3f prefill_draft %.3f draft %.3f verify %.3f accept %.3f "
           "total %.3f\n",
           m.timings_ms.vision, m.timings_ms.prefill_target, m.timings_ms.prefill_draft, m.timings_ms.draft,
           m.timings_ms.verify, m.timings_ms.accept, m.timings_ms.total);
    rc = 0;

done:
    free(tokens);
    free(accept);
    massv_request_free(&req);
    massv_engine_free(&engine);
    massv_engine_free(&engine); /* a second free through the same variable is a no-op */
    return rc;
}
