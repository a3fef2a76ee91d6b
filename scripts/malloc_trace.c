/* Log every heap allocation of 64 MB or more, and its release, with time and thread id.
 *
 * Used to find why jaxft's peak RSS under tcmalloc depends on a race (docs/benchmarks.md,
 * "The RSS target"): XLA:CPU's step workspace is one allocation per execution, and the trace
 * shows step N+1's workspace allocated on one worker thread before step N's is released on the
 * other.
 *
 *   gcc -O2 -shared -fPIC -o /tmp/malloc_trace.so scripts/malloc_trace.c -ldl
 *   LD_PRELOAD="/tmp/malloc_trace.so /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4" \
 *       .venv/bin/python ...          # this library first, so that it sees the calls
 *
 * Lines go to stderr: "A|F <address> <MB>MB t=<monotonic s> tid=<thread>".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <malloc.h>
static void *(*r_malloc)(size_t); static void (*r_free)(void*);
static int (*r_pm)(void**, size_t, size_t); static void *(*r_al)(size_t, size_t);
#define BIG (64u<<20)
static void *tracked[256]; static size_t tsz[256];
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
static void note(const char*k, void*p, size_t n){ char b[160]; int l=snprintf(b,160,"%s %p %zuMB t=%.4f tid=%ld\n",k,p,n>>20,now(),syscall(SYS_gettid)); write(2,b,l);}
static void add(void*p,size_t n){ if(n<BIG||!p) return; for(int i=0;i<256;i++) if(!tracked[i]){tracked[i]=p;tsz[i]=n;break;} note("A",p,n);}
void *malloc(size_t n){ if(!r_malloc) r_malloc=dlsym(RTLD_NEXT,"malloc"); void*p=r_malloc(n); add(p,n); return p;}
int posix_memalign(void**pp,size_t a,size_t n){ if(!r_pm) r_pm=dlsym(RTLD_NEXT,"posix_memalign"); int r=r_pm(pp,a,n); if(!r) add(*pp,n); return r;}
void *aligned_alloc(size_t a,size_t n){ if(!r_al) r_al=dlsym(RTLD_NEXT,"aligned_alloc"); void*p=r_al(a,n); add(p,n); return p;}
void free(void*p){ if(!r_free) r_free=dlsym(RTLD_NEXT,"free"); if(p) for(int i=0;i<256;i++) if(tracked[i]==p){note("F",p,tsz[i]);tracked[i]=0;break;} r_free(p);}
static void *(*r_ma)(size_t, size_t);
void *memalign(size_t a,size_t n){ if(!r_ma) r_ma=dlsym(RTLD_NEXT,"memalign"); void*p=r_ma(a,n); add(p,n); return p;}
static void *(*r_nw)(size_t, size_t);
void *_ZnwmSt11align_val_t(size_t n, size_t a){ if(!r_nw) r_nw=dlsym(RTLD_NEXT,"_ZnwmSt11align_val_t"); void*p=r_nw(n,a); add(p,n); return p;}
static void *(*r_n)(size_t);
void *_Znwm(size_t n){ if(!r_n) r_n=dlsym(RTLD_NEXT,"_Znwm"); void*p=r_n(n); add(p,n); return p;}
static void (*r_dla)(void*, size_t);
void _ZdlPvSt11align_val_t(void*p, size_t a){ if(!r_dla) r_dla=dlsym(RTLD_NEXT,"_ZdlPvSt11align_val_t"); if(p) for(int i=0;i<256;i++) if(tracked[i]==p){note("F",p,tsz[i]);tracked[i]=0;break;} r_dla(p,a);}
static void (*r_dl)(void*);
void _ZdlPv(void*p){ if(!r_dl) r_dl=dlsym(RTLD_NEXT,"_ZdlPv"); if(p) for(int i=0;i<256;i++) if(tracked[i]==p){note("F",p,tsz[i]);tracked[i]=0;break;} r_dl(p);}
