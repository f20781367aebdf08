// cpp_check.cpp — massv.h from C++: the header compiles cleanly as C++11
// (-Wall -Wextra -Werror -pedantic) and its functions link with C linkage.
//
//   c++ -std=c++11 cpp_check.cpp -I ffi/include -L target/release -lmassv -Wl,-rpath,target/release
//   ./a.out [TARGET_DIR]       prints the version; with a model, loads it and frees it
#include <cstdio>
#include <cstring>

#include "massv.h"

static_assert(MASSV_OK == 0, "MASSV_OK is 0");
static_assert(MASSV_ERR_INVALID_ARGUMENT < 0 && MASSV_ERR_INTERNAL < 0, "errors are negative");
static_assert(sizeof(massv_generate_params) >= sizeof(size_t) * 3, "params struct is complete");

namespace {

// A C++ callback: any function with the right signature will do.
int count_tokens(uint32_t, const char *, size_t, void *user_data) {
    ++*static_cast<size_t *>(user_data);
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    std::printf("massv %s\n", massv_version());
    massv_generate_params params = massv_generate_default_params();
    params.max_new_tokens = 4;
    massv_token_callback cb = count_tokens;
    if (argc < 2) return 0;

    massv_engine *engine = nullptr;
    massv_request *request = nullptr;
    size_t n = 0;
    int rc = 1;
    if (massv_engine_load(argv[1], nullptr, "cpu", &engine) == MASSV_OK &&
        massv_request_create("Hello from C++", &request) == MASSV_OK &&
        massv_request_set_params(request, &params) == MASSV_OK &&
        massv_generate(engine, request, cb, &n) == MASSV_OK) {
        std::printf("generated %zu tokens\n", n);
        rc = 0;
    } else {
        std::fprintf(stderr, "error: %s\n", massv_last_error());
    }
    massv_request_free(&request);
    massv_engine_free(&engine);
    return rc;
}
