// One AdamW update of a parameter group through libtorch's fused kernel
// (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)` calls): one pass over
// param, grad, exp_avg and exp_avg_sq per element instead of a dozen tensor ops with
// temporaries. tch does not bind ops that take tensor lists, hence this shim.
//
// Handles are tch's (`C_tensor` = `at::Tensor*`, torch-sys' torch_api.h).
#include <ATen/ops/_fused_adamw.h>

#include <vector>

#include "../ffi_guard.h"

extern "C" int otter_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                                 size_t n, at::Tensor* step, double lr, double beta1, double beta2, double weight_decay,
                                 double eps, char* err, size_t err_len) {
    return otter::guarded(err, err_len, [&] {
        std::vector<at::Tensor> p, g, m, v, s;
        p.reserve(n);
        g.reserve(n);
        m.reserve(n);
        v.reserve(n);
        s.reserve(n);
        for (size_t i = 0; i < n; i++) {
            p.push_back(*params[i]);
            g.push_back(*grads[i]);
            m.push_back(*exp_avgs[i]);
            v.push_back(*exp_avg_sqs[i]);
            s.push_back(*step);  // every parameter of the group is at the same step
        }
        at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, beta1, beta2, weight_decay, eps,
                          /*amsgrad=*/false, /*maximize=*/false);
    });
}
