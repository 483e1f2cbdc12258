/* JPEG decoding through libjpeg-turbo (Debian's libjpeg62-turbo-dev, linked statically),
 * the library Pillow's wheels bundle, so decoded pixels are Pillow's own: default
 * settings = accurate integer IDCT (JDCT_ISLOW) and "fancy" (triangle) chroma
 * upsampling, SIMD where the CPU has it.
 *
 * libjpeg reports errors by calling error_exit, which must not return; we longjmp back
 * here and hand the message to Rust. The jump never crosses a Rust frame: the only Rust
 * code called (the `alloc` callback) has returned before any further libjpeg call. */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

struct otter_err {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char *msg;
  size_t msg_len;
};

static void otter_error_exit(j_common_ptr cinfo) {
  struct otter_err *e = (struct otter_err *)cinfo->err;
  char buf[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, buf);
  snprintf(e->msg, e->msg_len, "%s", buf);
  longjmp(e->jump, 1);
}

/* Warnings (corrupt-but-decodable data) are not fatal, as in Pillow, except a premature
 * end of data: libjpeg would pad the image with grey, Pillow refuses ("image file is
 * truncated"), and so do we. */
static void otter_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) otter_error_exit(cinfo);
}

/* Decodes `len` bytes. `alloc(ctx, width, height, components)` returns a buffer of
 * width*height*components bytes (or NULL to abort). Components: 3 (RGB; greyscale is
 * expanded by libjpeg) or 4 (CMYK/YCCK as stored, Adobe-inverted for those files).
 * Returns 0 on success, -1 with a message in `msg` otherwise. */
int otter_jpeg_decode(const unsigned char *data, unsigned long len, void *ctx,
                      unsigned char *(*alloc)(void *ctx, unsigned width, unsigned height, int components),
                      char *msg, size_t msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct otter_err err;
  /* volatile: read after longjmp */
  volatile int created = 0;
  memset(&cinfo, 0, sizeof cinfo);
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = otter_error_exit;
  err.pub.emit_message = otter_emit_message;
  err.msg = msg;
  err.msg_len = msg_len;
  if (setjmp(err.jump)) {
    if (created) jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  created = 1;
  jpeg_mem_src(&cinfo, data, len);
  jpeg_read_header(&cinfo, TRUE);
  int components;
  switch (cinfo.jpeg_color_space) {
    case JCS_CMYK:
    case JCS_YCCK:
      cinfo.out_color_space = JCS_CMYK;
      components = 4;
      break;
    default: /* greyscale, YCbCr, RGB */
      cinfo.out_color_space = JCS_RGB;
      components = 3;
  }
  jpeg_start_decompress(&cinfo);
  if (cinfo.output_width == 0 || cinfo.output_height == 0 || cinfo.output_components != components) {
    snprintf(msg, msg_len, "unexpected JPEG output %ux%u with %d components", cinfo.output_width,
             cinfo.output_height, cinfo.output_components);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  unsigned char *out = alloc(ctx, cinfo.output_width, cinfo.output_height, components);
  if (!out) {
    snprintf(msg, msg_len, "out of memory for a %ux%u image", cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  size_t stride = (size_t)cinfo.output_width * components;
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW rows[4];
    int n = 0;
    for (; n < 4 && cinfo.output_scanline + n < cinfo.output_height; n++)
      rows[n] = out + (size_t)(cinfo.output_scanline + n) * stride;
    jpeg_read_scanlines(&cinfo, rows, n);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
