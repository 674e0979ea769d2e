// Shadows glibc's <sys/single_threaded.h> (glibc 2.32+) in the Bi-WKV build (cuda/build.py puts this folder
// first on the include path). libstdc++'s inline atomics (ext/atomicity.h) skip the atomic instruction when
// `__libc_single_threaded` says the process has one thread, and reading that flag imports a GLIBC_2.32 symbol.
// Here the flag is a constant "maybe several threads": the atomic path is always taken, which is always correct.
#pragma once

#define __libc_single_threaded bi_wkv_libc_single_threaded
static const char bi_wkv_libc_single_threaded = 0;
