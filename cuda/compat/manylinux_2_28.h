// Force-included into every C++ translation unit of the Bi-WKV build (cuda/build.py): keeps the shared object
// loadable on glibc 2.28 (manylinux_2_28). glibc 2.29 added new versions of these math functions (the same
// results without the old SVID error handling); the references bind to the original versions, which every
// glibc keeps.
#pragma once

#if defined(__linux__) && defined(__has_include)
#if __has_include(<features.h>)
#include <features.h>
#endif
#endif

#if defined(__GLIBC__) && defined(__x86_64__)
#define BI_WKV_GLIBC_BASE_VERSION "GLIBC_2.2.5"
#elif defined(__GLIBC__) && defined(__aarch64__)
#define BI_WKV_GLIBC_BASE_VERSION "GLIBC_2.17"
#endif

#ifdef BI_WKV_GLIBC_BASE_VERSION
__asm__(".symver exp,exp@" BI_WKV_GLIBC_BASE_VERSION);
__asm__(".symver exp2,exp2@" BI_WKV_GLIBC_BASE_VERSION);
__asm__(".symver log,log@" BI_WKV_GLIBC_BASE_VERSION);
__asm__(".symver log2,log2@" BI_WKV_GLIBC_BASE_VERSION);
__asm__(".symver pow,pow@" BI_WKV_GLIBC_BASE_VERSION);
#endif
